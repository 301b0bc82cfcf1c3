"""The copy of each atlas used, kept in ``OUTPUT_DIR/atlases/`` (a BEP038-style derivative
dataset) so that outputs can cite it as ``bids:atlases:<path>``.

:func:`publish_atlas` copies the file :meth:`~bids_fmristore.atlas.sources.AtlasCandidates.pick`
chose, checked first; parallel participant jobs publish the same atlas, so identical files
already there are kept and different ones refused.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import tempfile
from pathlib import Path

from bids_fmristore import __version__
from bids_fmristore.atlas import load_atlas, table_path_for
from bids_fmristore.atlas.sources import AtlasCandidates, describe_source
from bids_fmristore.atomic import atomic_path
from bids_fmristore.errors import AtlasError

__all__ = ["ATLASES_DIR", "publish_atlas"]

#: Folder of OUTPUT_DIR holding the atlases used (the ``atlases`` of ``bids:atlases:...``).
ATLASES_DIR = "atlases"


def publish_atlas(candidates: AtlasCandidates, chosen: Path, output_dir: Path, space: str, *,
                  overwrite: bool = False) -> str:
    """Copy the chosen image and its table into ``OUTPUT_DIR/atlases/`` (BEP038 layout).

    The image keeps its bytes; a table whose names column is ``label`` (some TemplateFlow
    tables) gets it renamed to ``name``. The atlas is checked with
    :func:`~bids_fmristore.atlas.load_atlas` before anything is written. Files already there
    with the same bytes are kept (parallel participant jobs publish the same atlas); different
    bytes are an AtlasError unless ``overwrite``.

    Parameters
    ----------
    space
        BOLD space, the ``tpl-`` of an atlas of unknown template.

    Returns
    -------
    str
        Path of the copied image relative to ``OUTPUT_DIR/atlases`` (``bids:atlases:<it>``).
    """
    file = next((f for f in candidates.files if f.image == Path(chosen)), None)
    if file is None:
        raise ValueError(f"{chosen} is not one of the files of atlas {candidates.label}")
    template = candidates.template or space
    ext = ".nii.gz" if chosen.name.endswith(".nii.gz") else ".nii"
    parts = [f"tpl-{template}"] + ([f"res-{file.res}"] if file.res else [])
    parts += [f"desc-{candidates.desc}"] if candidates.desc else []
    parts.append(f"atlas-{candidates.label}")
    stem = f"tpl-{template}/{'_'.join(parts)}_dseg"
    root = Path(output_dir) / ATLASES_DIR
    image_dst, table_dst = root / f"{stem}{ext}", root / f"{stem}.tsv"
    if not file.table.is_file():
        raise AtlasError(f"atlas {candidates.label}: label table {file.table} does not exist")
    table = _normalized_table(file.table.read_bytes())
    fresh = not (_same(image_dst, chosen) and table_dst.is_file()
                 and table_dst.read_bytes() == table)
    if fresh:
        _check(candidates.label, chosen, file.table, table)
        _install(table_dst, table, overwrite)
        _install(image_dst, chosen, overwrite)
    dataset = {"Name": "Atlases used by bids_fmristore", "BIDSVersion": "1.11.0",
               "DatasetType": "derivative",
               "GeneratedBy": [{"Name": "bids_fmristore", "Version": __version__}]}
    # JSON files: the first job's copy stays (descriptions may name another source's path)
    _install(root / "dataset_description.json", _json(dataset), False, keep=True)
    _install(root / f"atlas-{candidates.label}_description.json",
             _description(candidates, chosen, space), overwrite and fresh, keep=True)
    return f"{stem}{ext}"


def _normalized_table(data: bytes) -> bytes:
    """Rename a ``label`` names column to ``name``; any other table is returned unchanged."""
    try:
        header, newline, rest = data.decode("utf-8").partition("\n")
    except UnicodeDecodeError:
        return data  # load_atlas reports it
    columns = header.rstrip("\r").split("\t")
    if "name" in columns or "label" not in columns:
        return data
    columns[columns.index("label")] = "name"
    ending = header[len(header.rstrip("\r")):]
    return ("\t".join(columns) + ending + newline + rest).encode("utf-8")


def _check(label: str, image: Path, table: Path, content: bytes) -> None:
    """Validate with load_atlas; a renamed table is staged beside a link to the image."""
    if table == table_path_for(image) and content == table.read_bytes():
        load_atlas(label, image)
        return
    with tempfile.TemporaryDirectory(prefix="bids_fmristore-atlas-") as tmp:
        ext = ".nii.gz" if image.name.endswith(".gz") else ".nii"
        staged = Path(tmp) / f"atlas-{label}_dseg{ext}"
        try:
            staged.symlink_to(image.resolve())
        except OSError:  # file systems without symlinks
            shutil.copyfile(image, staged)
        table_path_for(staged).write_bytes(content)
        try:
            load_atlas(label, staged)
        except AtlasError as err:  # name the user's files, not the staged ones
            message = str(err).replace(str(staged), str(image))
            message = message.replace(table_path_for(staged).name, table.name)
            raise AtlasError(message.replace(staged.name, image.name)) from None


def _same(path: Path, source: Path | bytes) -> bool:
    if not path.is_file():
        return False
    if isinstance(source, bytes):
        return path.read_bytes() == source
    return filecmp.cmp(path, source, shallow=False)


def _install(dst: Path, source: Path | bytes, overwrite: bool, keep: bool = False) -> None:
    """Atomically create ``dst``; identical bytes already there (another job) are fine, other
    bytes an error unless ``overwrite`` (replace them) or ``keep`` (leave them)."""
    exists = dst.exists()  # read once: a concurrent job may create it right after
    if (keep and not overwrite and exists) or _same(dst, source):
        return
    if exists and not overwrite:
        raise AtlasError(f"{dst} exists with other content (earlier outputs may cite it); "
                         "remove it, rename the atlas, or overwrite")
    try:
        with atomic_path(dst, overwrite=overwrite) as tmp:
            if isinstance(source, bytes):
                tmp.write_bytes(source)
            else:
                shutil.copyfile(source, tmp)
    except FileExistsError:  # a concurrent job won the race: fine if it wrote the same
        if not keep and not _same(dst, source):
            raise AtlasError(f"{dst} was created meanwhile with other content") from None


def _json(content: dict) -> bytes:
    return (json.dumps(content, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _description(candidates: AtlasCandidates, chosen: Path, space: str) -> bytes:
    if candidates.description is not None:
        return candidates.description.read_bytes()
    if candidates.origin == "file":
        where = f"the file {chosen.resolve()}"
    else:
        where = describe_source(candidates.origin, candidates.root.resolve())
    text = f"Atlas {candidates.label} used by bids_fmristore, copied from {where}."
    if candidates.template is None:
        text += (f" Its file names no template; it was assumed to be in the BOLD space "
                 f"{space}, which is its tpl- label here.")
    return _json({"Name": candidates.label, "Description": text})
