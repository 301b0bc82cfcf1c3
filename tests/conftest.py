"""Builders of small BIDS / fMRIPrep-like datasets and atlases used across the tests."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SPACE = "MNI152NLin2009cAsym"

#: Non-cubic grid with a flipped x axis and a rotation (oblique), mm.
OBLIQUE_AFFINE = np.array(
    [
        [-2.0, 0.0, 0.0, 30.0],
        [0.0, 2.4 * np.cos(0.2), -3.0 * np.sin(0.2), -40.0],
        [0.0, 2.4 * np.sin(0.2), 3.0 * np.cos(0.2), -12.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=1))


def make_raw(root: Path, subjects=("01",), tasks=("rest",), runs=(1,), sessions=(None,)) -> Path:
    """A raw BIDS skeleton (dataset_description, participants, one tiny raw BOLD per run)."""
    write_json(root / "dataset_description.json",
               {"Name": "test", "BIDSVersion": "1.10.0", "DatasetType": "raw"})
    rows = ["participant_id\tage\tsex"] + [f"sub-{s}\t30\tF" for s in subjects]
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    for sub in subjects:
        for ses in sessions:
            for task in tasks:
                for run in runs:
                    stem = _stem(sub, ses, task, run)
                    folder = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "func"
                    folder.mkdir(parents=True, exist_ok=True)
                    img = nib.Nifti1Image(np.zeros((2, 2, 2, 3), np.int16), np.eye(4))
                    img.header.set_xyzt_units("mm", "sec")
                    nib.save(img, folder / f"{stem}_bold.nii.gz")
                    write_json(folder / f"{stem}_bold.json", {"RepetitionTime": 2.0,
                                                             "TaskName": task})
    return root


def _stem(sub, ses, task, run) -> str:
    parts = [f"sub-{sub}"] + ([f"ses-{ses}"] if ses else []) + [f"task-{task}"]
    return "_".join(parts + ([f"run-{run:02d}"] if run is not None else []))


def make_fmriprep_run(
    root: Path, data: np.ndarray, affine: np.ndarray, mask: np.ndarray, *, sub="01", ses=None,
    task="rest", run=1, tr=2.0, space=SPACE, res=None, slope=None, inter=None, ext=".nii.gz",
    header_tr=None,
) -> Path:
    """Write one fMRIPrep-style preprocessed run (BOLD + JSON + brain mask); return the BOLD."""
    if not (root / "dataset_description.json").exists():
        write_json(root / "dataset_description.json", {
            "Name": "fMRIPrep test", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "fMRIPrep"}]})
    folder = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "func"
    folder.mkdir(parents=True, exist_ok=True)
    ents = _stem(sub, ses, task, run) + f"_space-{space}" + (f"_res-{res}" if res else "")
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = tr if header_tr is None else header_tr
    if slope is not None:
        img.header.set_slope_inter(slope, inter or 0.0)
    bold = folder / f"{ents}_desc-preproc_bold{ext}"
    nib.save(img, bold)
    write_json(folder / f"{ents}_desc-preproc_bold.json", {"RepetitionTime": tr,
                                                           "TaskName": task})
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), affine)
    nib.save(mask_img, folder / f"{ents}_desc-brain_mask{ext}")
    return bold


def make_atlas(folder: Path, labels: np.ndarray, affine: np.ndarray, name="Test",
               names: dict[int, str] | None = None, extra_rows=()) -> Path:
    """A labels NIfTI with its index/name TSV; ``extra_rows`` adds labels absent from the image."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"atlas-{name}_dseg.nii.gz"
    nib.save(nib.Nifti1Image(labels.astype(np.int16), affine), path)
    ids = sorted(set(np.unique(labels).tolist()) - {0} | set(extra_rows))
    names = names or {}
    rows = ["index\tname"] + [f"{i}\t{names.get(i, f'region{i}')}" for i in ids]
    (folder / f"atlas-{name}_dseg.tsv").write_text("\n".join(rows) + "\n")
    return path


def random_labels(shape, n_labels, rng, background=0.3) -> np.ndarray:
    """Blocky random labels with ~``background`` fraction of zeros (ids 1..n, not contiguous)."""
    labels = rng.integers(1, n_labels + 1, size=shape)
    labels[rng.random(shape) < background] = 0
    return labels


@pytest.fixture
def package_logs_reach_caplog(monkeypatch):
    """main() makes the ``bids_fmristore`` logger stop propagating; undo that for caplog."""
    logger = logging.getLogger("bids_fmristore")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", True)
    monkeypatch.setattr(logger, "level", logging.NOTSET)


@pytest.fixture
def rng():
    return np.random.default_rng(20261121)
