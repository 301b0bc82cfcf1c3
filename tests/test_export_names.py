"""export: names that keep the file's entities, verbosity flags, and damaged files that
leave OUT_DIR as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from bids_fmristore.cli.export import export_main
from bids_fmristore.errors import EXIT_INPUT, EXIT_OK
from bids_fmristore.export import export_file, image_names
from bids_fmristore.formats.header import Geometry
from bids_fmristore.formats.labeled import write_labeled
from bids_fmristore.formats.multiscan import ClusterLayout
from bids_fmristore.formats.multiscan_writer import MultiScanWriter

SHAPE = (4, 3, 2)
FIXTURES = Path(__file__).parent / "data" / "fmristore-written"


@pytest.mark.parametrize("stem, labels, expected", [
    ("space-MNI_res-2_stat-mean_bold", ["sub-01"], ["sub-01_space-MNI_res-2_stat-mean_bold"]),
    ("sub-01_space-MNI_atlas-Demo_bold", ["sub-01_task-rest_run-01"],
     ["sub-01_task-rest_run-01_space-MNI_atlas-Demo_bold"]),
    ("sub-01_space-MNI_desc-voxelstats_bold", ["sub-01_task-rest_run-01_stat-tsnr"],
     ["sub-01_task-rest_run-01_stat-tsnr_space-MNI_desc-voxelstats_bold"]),
    # not BIDS-like labels: label-<alphanumerics>, before the suffix, replacing the file's label
    ("sub-01_label-old_desc-x_bold", ["subject 3", "mean"],
     ["sub-01_desc-x_label-subject3_bold", "sub-01_desc-x_label-mean_bold"]),
    # equal once reduced to letters and digits (or empty): their position in the file is added
    ("stat-mean_bold", ["a b", "ab", "c", "/"],
     ["stat-mean_label-ab1_bold", "stat-mean_label-ab2_bold", "stat-mean_label-c_bold",
      "stat-mean_label-4_bold"]),
    # a file name without entities keeps its whole stem in front
    ("labeled", ["faces", "sub-01"], ["labeled_label-faces", "labeled_sub-01"]),
    ("my maps", ["x"], ["my_maps_label-x"]),
])
def test_image_names(stem, labels, expected):
    assert image_names(stem, labels) == expected


def _group_file(folder: Path, stat: str, rng) -> Path:
    mask = np.ones(SHAPE, bool)
    return write_labeled(folder / f"space-MNI_res-2_stat-{stat}_bold.h5", mask=mask,
                         affine=np.eye(4), labels=["sub-01", "sub-02"],
                         volumes=[rng.normal(size=SHAPE) for _ in range(2)])


def test_two_group_files_into_one_folder(tmp_path, rng, capsys):
    out = tmp_path / "out"
    for stat in ("mean", "tsnr"):
        assert export_main([str(_group_file(tmp_path, stat, rng)), str(out)]) == EXIT_OK
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"sub-0{s}_space-MNI_res-2_stat-{stat}_bold.nii.gz"
        for s in (1, 2) for stat in ("mean", "tsnr"))
    assert capsys.readouterr().err == ""


def _multiscan(path: Path, rng, scans=("sub-01_task-rest_run-01", "sub-01_task-rest_run-02")):
    mask = np.ones(SHAPE, bool)
    layout = ClusterLayout(mask, np.repeat([1, 2], 12))
    with MultiScanWriter(path, geometry=Geometry(SHAPE, np.eye(4)), layout=layout,
                         store="both") as writer:
        for name in scans:
            scan = writer.add_scan(name, 5, {"TR": 2.0})
            scan.write_voxels(rng.normal(size=(5, 24)).astype(np.float32))
            scan.write_summary(np.zeros((5, 2)))
    return path


def test_multiscan_names(tmp_path, rng):
    path = _multiscan(tmp_path / "sub-01_space-MNI_atlas-Demo_bold.h5", rng)
    written = export_file(path, tmp_path / "out")
    assert [p.name for p in written] == [
        f"sub-01_task-rest_run-0{r}_space-MNI_atlas-Demo_bold.nii.gz" for r in (1, 2)]
    assert nib.load(written[1]).shape == (*SHAPE, 5)


def test_verbose_and_debug_are_accepted(tmp_path, rng, capsys):
    path = _group_file(tmp_path, "mean", rng)
    assert export_main([str(path), str(tmp_path / "a"), "-v"]) == EXIT_OK
    err = capsys.readouterr().err
    assert "bids_fmristore: INFO: " in err and "exporting 2 image(s)" in err
    assert export_main([str(path), str(tmp_path / "b"), "--debug"]) == EXIT_OK
    assert "exporting 2 image(s)" in capsys.readouterr().err
    assert export_main([str(path), str(tmp_path / "c")]) == EXIT_OK
    assert capsys.readouterr().err == ""


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "WARNING" not in line]
    assert len(lines) == 1 and lines[0].startswith("bids_fmristore: ERROR: "), err
    return lines[0][len("bids_fmristore: ERROR: "):]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_second_label(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        del f["data/sub-02"]


def _damage_second_scan(path: Path) -> None:
    with h5py.File(path, "r") as f:
        chunk = f["scans/sub-01_task-rest_run-02/clusters/cluster_2"].id.get_chunk_info(0)
    with open(path, "r+b") as raw:
        raw.seek(chunk.byte_offset)
        raw.write(b"\xff" * chunk.size)


@pytest.mark.parametrize("damage, message", [
    ("truncated", "not an HDF5 file or truncated"),
    ("missing dataset", "label 'sub-02' has no dataset /data/sub-02"),
    ("damaged chunk", "cannot read /scans/sub-01_task-rest_run-02/clusters/cluster_2: "),
])
@pytest.mark.parametrize("out_exists", [False, True])
def test_damaged_file_leaves_out_dir_as_it_was(tmp_path, rng, capsys, damage, message,
                                               out_exists):
    if damage == "damaged chunk":
        path = _multiscan(tmp_path / "sub-01_space-MNI_atlas-Demo_bold.h5", rng)
        _damage_second_scan(path)
    else:
        path = _group_file(tmp_path, "mean", rng)
        (_truncate if damage == "truncated" else _drop_second_label)(path)
    out = tmp_path / "out"
    if out_exists:  # an earlier export: kept as it was, even with --overwrite
        out.mkdir()
        old = out / "sub-01_space-MNI_res-2_stat-mean_bold.nii.gz"
        old.write_bytes(b"old")
    argv = [str(path), str(out)] + (["--overwrite"] if out_exists else [])
    assert export_main(argv) == EXIT_INPUT
    line = _error_line(capsys)
    assert line.startswith(f"{path}: {message}"), line
    if out_exists:
        assert [p.name for p in out.iterdir()] == [old.name] and old.read_bytes() == b"old"
    else:
        assert not out.exists()


def test_fmristore_fixture_missing_cluster(tmp_path, capsys):
    path = tmp_path / "multiscan_parcellated.h5"
    shutil.copy(FIXTURES / path.name, path)
    with h5py.File(path, "r+") as f:
        del f["scans/run_full/clusters/cluster_3"]
    assert export_main([str(path), str(tmp_path / "out")]) == EXIT_INPUT
    assert _error_line(capsys) == f"{path}: scan 'run_full' has no cluster_3"
    assert not (tmp_path / "out").exists()
