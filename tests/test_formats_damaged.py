"""Damaged or incomplete fmristore files: one FormatError naming the file and what is wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import bids_fmristore
from bids_fmristore.errors import FormatError, InputError
from bids_fmristore.formats.labeled import LabeledVolumeSet
from bids_fmristore.formats.multiscan import ParcellatedMultiScan
from bids_fmristore.formats.neurovec import H5NeuroVec, H5NeuroVol

FIXTURES = Path(__file__).parent / "data" / "fmristore-written"
READERS = {
    "labeled.h5": LabeledVolumeSet,
    "multiscan_clustered_deprecated.h5": ParcellatedMultiScan,
    "multiscan_parcellated.h5": ParcellatedMultiScan,
    "multiscan_write_dataset.h5": ParcellatedMultiScan,
    "multiscan_write_dataset_summary.h5": ParcellatedMultiScan,
    "neurovec.h5": H5NeuroVec,
    "neurovol.h5": H5NeuroVol,
}


def _copy(name: str, tmp_path: Path, edit=None) -> Path:
    path = tmp_path / name
    shutil.copy(FIXTURES / name, path)
    if edit is not None:
        with h5py.File(path, "r+") as f:
            edit(f)
    return path


def _one_line(err: pytest.ExceptionInfo, path: Path) -> str:
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    return message[len(f"{path}: "):]


def test_format_error_is_exported_and_an_input_error():
    assert bids_fmristore.FormatError is FormatError
    assert issubclass(FormatError, InputError)


@pytest.mark.parametrize("name", sorted(READERS))
@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_unreadable_files(tmp_path, name, damage):
    path = tmp_path / name
    content = (FIXTURES / name).read_bytes()
    path.write_bytes({"truncated": content[: len(content) // 2], "empty": b"",
                      "text": b"index\tname\n1\tA\n"}[damage])
    for opener in (bids_fmristore.open, READERS[name]):
        with pytest.raises(FormatError) as err:
            opener(path)
        assert _one_line(err, path) == "not an HDF5 file or truncated"


def test_missing_file_stays_file_not_found(tmp_path):
    for opener in (bids_fmristore.open, ParcellatedMultiScan, LabeledVolumeSet, H5NeuroVec):
        with pytest.raises(FileNotFoundError, match="nope.h5"):
            opener(tmp_path / "nope.h5")


@pytest.mark.parametrize("name", [n for n in READERS if n.startswith("multiscan")])
@pytest.mark.parametrize("key, message", [
    ("mask", "missing /mask (not an H5ParcellatedMultiScan file?)"),
    ("header", "missing /header (not an H5ParcellatedMultiScan file?)"),
    ("cluster_map", "missing /cluster_map (not an H5ParcellatedMultiScan file?)"),
])
def test_multiscan_missing_objects(tmp_path, name, key, message):
    path = _copy(name, tmp_path, lambda f: f.__delitem__(key))
    with pytest.raises(FormatError) as err:
        ParcellatedMultiScan(path)
    assert _one_line(err, path) == message
    with pytest.raises(FormatError) as err:  # detection still says multiscan (fmristore_class)
        bids_fmristore.open(path)
    assert _one_line(err, path) == message


def test_multiscan_missing_cluster_dataset_found_lazily(tmp_path):
    path = _copy("multiscan_parcellated.h5", tmp_path,
                 lambda f: f.__delitem__("scans/run_full/clusters/cluster_2"))
    with bids_fmristore.open(path) as f:
        assert f.scan_names == ["run_full", "run_summary"]
        first = np.flatnonzero(f.cluster_map != 2)[:2]
        assert f.series("run_full", first).shape == (6, 2)  # other clusters still read
        with pytest.raises(FormatError) as err:
            f.series("run_full")
        assert _one_line(err, path) == "scan 'run_full' has no cluster_2"
        with pytest.raises(KeyError, match="no scan 'nope'"):  # a caller's slip, not damage
            f.series("nope")


def test_multiscan_n_time_without_metadata_needs_a_cluster(tmp_path):
    def strip(f):
        group = f["scans/runA"]
        if "n_time" in group.attrs:
            del group.attrs["n_time"]
        if "metadata" in group:
            del group["metadata"]
        first = int(f["cluster_map"][0])
        del group[f"clusters/cluster_{first}"]

    path = _copy("multiscan_write_dataset.h5", tmp_path, strip)
    with ParcellatedMultiScan(path) as f:
        with pytest.raises(FormatError) as err:
            f.n_time("runA")
        assert _one_line(err, path).startswith("scan 'runA' has no cluster_")


def test_multiscan_damaged_chunk_found_when_read(tmp_path):
    """Bytes of one compressed chunk overwritten: the file opens; reading it is a FormatError."""
    path = _copy("multiscan_parcellated.h5", tmp_path)
    with h5py.File(path, "r") as f:
        ds = f["scans/run_full/clusters/cluster_1"]
        info = ds.id.get_chunk_info(0)
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset)
        raw.write(b"\xff" * info.size)
    with ParcellatedMultiScan(path) as f:
        with pytest.raises(FormatError) as err:
            f.series("run_full")
    assert _one_line(err, path).startswith(
        "cannot read /scans/run_full/clusters/cluster_1: ")


def test_multiscan_cluster_of_the_wrong_shape(tmp_path):
    def shrink(f):
        data = f["scans/runA/clusters/cluster_1"][()]
        del f["scans/runA/clusters/cluster_1"]
        f["scans/runA/clusters/cluster_1"] = data[:, :-1]

    path = _copy("multiscan_write_dataset.h5", tmp_path, shrink)
    with ParcellatedMultiScan(path) as f:
        with pytest.raises(FormatError, match=r"cluster_1 has shape \(5, \d+\), expected"):
            f.series("runA")


@pytest.mark.parametrize("key", ["mask", "header", "labels"])
def test_labeled_missing_objects(tmp_path, key):
    path = _copy("labeled.h5", tmp_path, lambda f: f.__delitem__(key))
    with pytest.raises(FormatError) as err:
        LabeledVolumeSet(path)
    assert _one_line(err, path) == f"missing /{key} (not a LabeledVolumeSet file?)"
    with pytest.raises(FormatError) as err:  # detected as another layout, or not at all
        bids_fmristore.open(path)
    _one_line(err, path)


def test_labeled_missing_volume_found_lazily(tmp_path):
    path = _copy("labeled.h5", tmp_path, lambda f: f.__delitem__("data/houses"))
    with bids_fmristore.open(path) as f:
        assert f.labels == ["faces", "houses", "words"]
        assert f.volume("faces").shape == f.shape
        with pytest.raises(FormatError) as err:
            f.volume("houses")
    assert _one_line(err, path) == "label 'houses' has no dataset /data/houses"


@pytest.mark.parametrize("name, reader", [("neurovec.h5", H5NeuroVec),
                                          ("neurovol.h5", H5NeuroVol)])
@pytest.mark.parametrize("key", ["space/dim", "space/trans", "data/elements"])
def test_dense_missing_objects(tmp_path, name, reader, key):
    path = _copy(name, tmp_path, lambda f: f.__delitem__(key))
    with pytest.raises(FormatError) as err:
        reader(path)
    message = _one_line(err, path)
    assert message.startswith("missing /") or message.startswith("no 4-D dataset"), message
    if key != "data/elements" or name == "neurovol.h5":
        assert message == f"missing /{key} (not an {reader.__name__} file?)"


def test_header_dim_unreadable_is_a_format_error(tmp_path):
    def bad_dim(f):
        del f["header/dim"]
        f["header/dim"] = np.array([b"x", b"y"])

    path = _copy("multiscan_parcellated.h5", tmp_path, bad_dim)
    with pytest.raises(FormatError) as err:
        ParcellatedMultiScan(path)
    _one_line(err, path)
