"""detect_type follows fmristore's detect_h5_type rules in order; open dispatches on it."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import OBLIQUE_AFFINE

from bids_fmristore.errors import FormatError
from bids_fmristore.formats import detect
from bids_fmristore.formats.detect import detect_type
from bids_fmristore.formats.labeled import LabeledVolumeSet, write_labeled
from bids_fmristore.formats.multiscan import ParcellatedMultiScan
from bids_fmristore.formats.neurovec import H5NeuroVec, H5NeuroVol, write_neurovec, write_neurovol

FIXTURES = Path(__file__).parent / "data" / "fmristore-written"
VLEN = h5py.string_dtype()


def build(path: Path, spec: dict) -> Path:
    """HDF5 file from ``{"@attr": value, "group/dataset": array, "group/": None}``."""
    with h5py.File(path, "w") as f:
        for key, value in spec.items():
            if key.startswith("@"):
                f.attrs[key[1:]] = value
            elif key.endswith("/"):
                f.create_group(key)
            else:
                f[key] = value
    return path


def r_string(text: str) -> np.ndarray:
    """A string attribute as fmristore writes it: vlen array of shape (1,)."""
    return np.array([text], dtype=VLEN)


CASES = {
    # 1. fmristore_class, verbatim, in every string form, beats all structure
    "class_vlen_array": ({"@fmristore_class": r_string("Anything"), "labels": ["a"]}, "Anything"),
    "class_bytes": ({"@fmristore_class": np.bytes_(b"LabeledVolumeSet")}, "LabeledVolumeSet"),
    "class_str": ({"@fmristore_class": "H5NeuroVec", "scans/": None}, "H5NeuroVec"),
    # 2. rtype
    "rtype_dense_vol": ({"@rtype": r_string("DenseNeuroVol")}, "H5NeuroVol"),
    "rtype_sparse_vol": ({"@rtype": "SparseNeuroVol"}, "H5NeuroVol"),
    "rtype_dense_vec": ({"@rtype": "DenseNeuroVec"}, "H5NeuroVec"),
    "rtype_sparse_vec": ({"@rtype": r_string("SparseNeuroVec")}, "H5NeuroVec"),
    "rtype_other_falls_through": ({"@rtype": "NeuroVecSeq", "labels": ["a"]}, "LabeledVolumeSet"),
    # 3-4. scans
    "multiscan": (
        {"scans/": None, "cluster_map": [1, 2], "header/dim": [4, 1, 1, 2]},
        "H5ParcellatedMultiScan",
    ),
    "multiscan_before_labels": (
        {"scans/": None, "cluster_map": [1], "labels": ["a"]},
        "H5ParcellatedMultiScan",
    ),
    "vecseq": ({"scans/": None, "header/dim": [4, 2, 2, 2, 3]}, "H5NeuroVecSeq"),
    "latent_without_class_is_vecseq": (
        {"scans/": None, "header/dim": [4, 2, 2, 2, 3], "basis/basis_matrix": np.ones((8, 2))},
        "H5NeuroVecSeq",
    ),
    "scans_alone": ({"scans/": None}, "unknown"),
    # 5. latent
    "latent_matrix": ({"basis/basis_matrix": np.ones((8, 2))}, "LatentNeuroVec"),
    "latent_data": ({"basis/basis_data": np.ones((8, 2)), "labels": ["a"]}, "LatentNeuroVec"),
    # 6. labels
    "labels": ({"labels": np.array(["a", "b"], dtype=VLEN)}, "LabeledVolumeSet"),
    "labels_empty": (
        {"labels": np.array([], dtype=VLEN), "data": np.ones((2, 3, 4))},
        "H5NeuroVol",
    ),
    "labels_group": ({"labels/": None}, "unknown"),
    # 7. /data rank
    "data_3d": ({"data": np.ones((2, 3, 4))}, "H5NeuroVol"),
    "data_4d": ({"data": np.ones((2, 3, 4, 5))}, "H5NeuroVec"),
    "data_2d": ({"data": np.ones((2, 3))}, "unknown"),
    "data_group": ({"data/elements": np.ones((2, 3, 4, 5))}, "unknown"),
    # 8. /space/dim length
    "space_dim_3": ({"space/dim": [4, 3, 2]}, "H5NeuroVol"),
    "space_dim_4": ({"space/dim": [4, 3, 2, 9], "header/dim": [3, 4, 3, 2]}, "H5NeuroVec"),
    "space_dim_5": ({"space/dim": [4, 3, 2, 9, 1]}, "unknown"),
    # 9. /header/dim heuristics, first match wins
    "header_dim_rank3": ({"header/dim": [3, 4, 3, 2, 7]}, "H5NeuroVol"),
    "header_dim_one_volume": ({"header/dim": [4, 4, 3, 2, 1, 1, 1, 1]}, "H5NeuroVol"),
    "header_dim_volumes": ({"header/dim": [4, 4, 3, 2, 7, 1, 1, 1]}, "H5NeuroVec"),
    "header_dim_rank4_short": ({"header/dim": [4, 4, 3, 2]}, "H5NeuroVec"),
    "header_dim_other": ({"header/dim": [2, 4, 3, 2, 0]}, "unknown"),
    "header_dim_too_short": ({"header/dim": [3, 4]}, "unknown"),
    # 10.
    "empty": ({}, "unknown"),
}


@pytest.mark.parametrize("name", CASES)
def test_detect_rules(tmp_path, name):
    spec, expected = CASES[name]
    assert detect_type(build(tmp_path / f"{name}.h5", spec)) == expected


@pytest.mark.parametrize(
    "name, expected",
    [
        ("labeled.h5", "LabeledVolumeSet"),
        ("multiscan_parcellated.h5", "H5ParcellatedMultiScan"),
        ("multiscan_write_dataset_summary.h5", "H5ParcellatedMultiScan"),
        ("neurovec.h5", "H5NeuroVec"),
        ("neurovol.h5", "H5NeuroVol"),
    ],
)
def test_detect_fmristore_files(name, expected):
    assert detect_type(FIXTURES / name) == expected


def test_detect_our_files(tmp_path):
    mask = np.ones((3, 4, 2), bool)
    write_labeled(
        tmp_path / "l.h5",
        mask=mask,
        affine=OBLIQUE_AFFINE,
        labels=["a"],
        volumes=[np.ones(mask.shape)],
    )
    write_neurovol(tmp_path / "v.h5", np.ones((3, 4, 2)), OBLIQUE_AFFINE)
    write_neurovec(tmp_path / "w.h5", np.ones((3, 4, 2, 2)), OBLIQUE_AFFINE)
    assert detect_type(tmp_path / "l.h5") == "LabeledVolumeSet"
    assert detect_type(tmp_path / "v.h5") == "H5NeuroVol"
    assert detect_type(str(tmp_path / "w.h5")) == "H5NeuroVec"
    with detect.open(tmp_path / "l.h5") as lv:
        assert isinstance(lv, LabeledVolumeSet) and lv.labels == ["a"]


@pytest.mark.parametrize(
    "name, cls",
    [
        ("labeled.h5", LabeledVolumeSet),
        ("multiscan_parcellated.h5", ParcellatedMultiScan),
        ("multiscan_write_dataset.h5", ParcellatedMultiScan),
        ("neurovec.h5", H5NeuroVec),
        ("neurovol.h5", H5NeuroVol),
    ],
)
def test_open_dispatches(name, cls):
    reader = detect.open(FIXTURES / name)
    try:
        assert type(reader) is cls
    finally:
        reader.close()


@pytest.mark.parametrize(
    "spec, kind",
    [
        ({"@fmristore_class": "H5NeuroVecSeq"}, "H5NeuroVecSeq"),
        ({}, "unknown"),
    ],
)
def test_open_refuses_other_types(tmp_path, spec, kind):
    path = build(tmp_path / "x.h5", spec)
    with pytest.raises(FormatError, match=rf"x\.h5: not an fmristore file \(detected: {kind}\)"):
        detect.open(path)


def test_open_of_an_incomplete_latent_file_names_what_is_missing(tmp_path):
    # LatentNeuroVec files are opened since issue 12; one without /header is a FormatError
    path = build(tmp_path / "x.h5", {"basis/basis_matrix": np.ones((2, 2))})
    with pytest.raises(FormatError, match=r"x\.h5: missing /header \(not a LatentNeuroVec"):
        detect.open(path)


def test_missing_and_non_hdf5_files(tmp_path):
    missing = tmp_path / "nope.h5"
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        detect_type(missing)
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        detect.open(missing)
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    with pytest.raises(FormatError, match="text.h5: not an HDF5 file or truncated"):
        detect.open(text)
