"""A catalog of bad input, each case on a dataset where sub-01 and sub-02 are good and sub-03
(run-1) carries the defect, or the defect is global: a documented exit code, one-line errors
naming the offending file or value, no traceback, nothing partial or half-written, and the good
subjects written whenever the defect is only one run's or one subject's."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from messy import (
    AFFINE_B,
    SHAPE_A,
    SHAPE_B,
    assert_clean_stderr,
    assert_outputs_complete,
    atlas_of,
    bold_data,
    bold_json,
    brain_mask,
    cli_args,
    corrupt_gzip_middle,
    error_lines,
    good_dataset,
    huge_header,
    lines_of,
    mask_of,
    rewrite_run,
    run_cli,
    subject_files,
    truncate,
    ungzip_keep_name,
    write_json,
)

import bids_fmristore
from bids_fmristore.cli.run import main
from bids_fmristore.errors import (
    EXIT_ATLAS,
    EXIT_INPUT,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    FormatError,
)

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Defect:
    """What a case did to the dataset: the names an ERROR/WARNING line must contain one of,
    extra command-line arguments, and whether only sub-03 is concerned."""

    needles: tuple[str, ...]
    argv: list[str] = field(default_factory=list)
    #: replaces the whole argv (for OUTPUT_DIR and -w cases)
    out: Path | None = None
    local: bool = True


def _bold(ds) -> Path:
    return ds["bolds"]["03", 1]


def _names(path: Path) -> tuple[str, ...]:
    return (path.name,)


# -- damaged NIfTI (exit 5) --------------------------------------------------------------------


def truncated_gz(ds):
    truncate(_bold(ds), 0.5)
    return Defect(_names(_bold(ds)))


def truncated_header(ds):
    raw = gzip.decompress(_bold(ds).read_bytes())
    _bold(ds).write_bytes(gzip.compress(raw[:200]))
    return Defect(_names(_bold(ds)))


def zero_bytes(ds):
    _bold(ds).write_bytes(b"")
    return Defect(_names(_bold(ds)))


def not_gzip(ds):
    ungzip_keep_name(_bold(ds))
    return Defect(_names(_bold(ds)))


def huge_dims(ds):
    huge_header(_bold(ds))
    return Defect(_names(_bold(ds)))


def corrupted_gzip(ds):
    corrupt_gzip_middle(_bold(ds))
    return Defect(_names(_bold(ds)))


def truncated_nii(ds):
    bold = rewrite_run(ds, "03", 1, ext=".nii")
    truncate(bold, 0.6)
    return Defect(_names(bold))


def all_nan(ds):
    data = np.full((*SHAPE_A, 6), np.nan, np.float32)
    return Defect(_names(rewrite_run(ds, "03", 1, data)))


def three_d(ds):
    data = bold_data(SHAPE_A, np.random.default_rng(1), 1)[..., 0]
    return Defect(_names(rewrite_run(ds, "03", 1, data)))


def _tr_value(value):
    def damage(ds):
        path = bold_json(_bold(ds))
        write_json(path, {"RepetitionTime": value, "TaskName": "rest"})
        return Defect((path.name, _bold(ds).name, str(value)))

    damage.__name__ = f"tr_{value}"
    return damage


def mask_damaged(ds):
    mask = mask_of(_bold(ds))
    truncate(mask, 0.5)
    return Defect(_names(mask))


def sidecar_invalid(ds):
    path = bold_json(_bold(ds))
    path.write_text('{"RepetitionTime": 2.0,')
    return Defect(_names(path))


def sidecar_empty(ds):
    path = bold_json(_bold(ds))
    path.write_text("")
    return Defect(_names(path))


def sidecar_folder(ds):
    path = bold_json(_bold(ds))
    path.unlink()
    path.mkdir()
    return Defect(_names(path))


# -- defects a run survives (exit 0, with a WARNING naming the file) ---------------------------


def partly_nan(ds):
    data = bold_data(SHAPE_A, np.random.default_rng(2), 6)
    data[1:4, 2, 3, :] = np.nan  # 3 voxels, 18 values
    bold = rewrite_run(ds, "03", 1, data)
    # all three inside the brain mask, so that the count reported is theirs
    mask_path = bold.with_name(bold.name.replace("desc-preproc_bold", "desc-brain_mask"))
    mask = nib.load(mask_path)
    inside = np.asanyarray(mask.dataobj).copy()
    inside[1:4, 2, 3] = 1
    nib.save(nib.Nifti1Image(inside, mask.affine, mask.header), mask_path)
    return Defect(_names(bold))


def inf_voxel(ds):
    data = bold_data(SHAPE_A, np.random.default_rng(2), 6)
    data[4, 5, 4, 2] = np.inf
    return Defect(_names(rewrite_run(ds, "03", 1, data)))


def tr_disagrees(ds):
    return Defect(_names(rewrite_run(ds, "03", 1, header_tr=3.0)))


def no_brain_mask(ds):
    for run in (1, 2):
        mask_of(ds["bolds"]["03", run]).unlink()
    return Defect(("sub-03_task-rest_run-01",))




# -- defects with no effect (exit 0) -----------------------------------------------------------


def mask_other_grid(ds):
    mask = mask_of(_bold(ds))
    nib.save(nib.Nifti1Image(brain_mask(SHAPE_B, np.random.default_rng(4)).astype(np.uint8),
                             AFFINE_B), mask)
    return Defect(_names(mask))


WARNED = {partly_nan, inf_voxel, tr_disagrees, no_brain_mask, mask_other_grid}


def unrelated_invalid_json(ds):
    path = ds["fmriprep"] / "sub-03" / "anat" / "sub-03_desc-preproc_T1w.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    return Defect(())


# -- global defects ----------------------------------------------------------------------------


def derivatives_description_invalid(ds):
    path = ds["fmriprep"] / "dataset_description.json"
    path.write_text('{"Name": "fMRIPrep", ')
    return Defect(("dataset_description.json",), local=False)


def _atlas(ds) -> Path:
    return ds["atlases"]["B"]


def _tsv(ds) -> Path:
    return _atlas(ds).with_name(_atlas(ds).name.replace(".nii.gz", ".tsv"))


def atlas_float(ds):
    img = nib.load(_atlas(ds))
    labels = np.asanyarray(img.dataobj).astype(np.float32)
    labels[labels == 2] = 2.5
    nib.save(nib.Nifti1Image(labels, img.affine), _atlas(ds))
    return Defect(_names(_atlas(ds)), local=False)


def atlas_table_missing(ds):
    _tsv(ds).unlink()
    return Defect(_names(_tsv(ds)), local=False)


def atlas_table_no_index(ds):
    _tsv(ds).write_text("".join(f"region{i}\n" for i in range(1, 10)))
    return Defect(_names(_tsv(ds)), local=False)


def atlas_truncated(ds):
    truncate(_atlas(ds), 0.5)
    return Defect(_names(_atlas(ds)), local=False)


def atlas_4d(ds):
    img = nib.load(_atlas(ds))
    labels = np.asanyarray(img.dataobj)
    nib.save(nib.Nifti1Image(np.stack([labels, labels], axis=-1), img.affine), _atlas(ds))
    return Defect(_names(_atlas(ds)), local=False)


def label_dotdot(ds):
    return Defect(("../x",), argv=["--participant-label", "../x"], local=False)


def label_slash(ds):
    return Defect(("sub-01/..",), argv=["--participant-label", "sub-01/.."], local=False)


def label_unknown(ds):
    return Defect(("99",), argv=["--participant-label", "99"], local=False)


def out_is_file(ds):
    out = ds["tmp"] / "out.txt"
    out.write_text("not a folder")
    return Defect((out.name,), out=out, local=False)


def out_parent_is_file(ds):
    parent = ds["tmp"] / "parent.txt"
    parent.write_text("not a folder")
    return Defect((parent.name,), out=parent / "out", local=False)


def work_dir_is_file(ds):
    work = ds["tmp"] / "work.txt"
    work.write_text("not a folder")
    return Defect((work.name,), argv=["-w", str(work)], local=False)


def filter_unknown_entity(ds):
    path = ds["tmp"] / "filters.json"
    path.write_text(json.dumps({"bold": {"flavour": "vanilla"}}))
    return Defect(("flavour",), argv=["--bids-filter-file", str(path)], local=False)


CASES = [
    (truncated_gz, EXIT_PARTIAL), (truncated_header, EXIT_PARTIAL), (zero_bytes, EXIT_PARTIAL),
    (not_gzip, EXIT_PARTIAL), (corrupted_gzip, EXIT_PARTIAL),
    (truncated_nii, EXIT_PARTIAL), (all_nan, EXIT_PARTIAL), (partly_nan, EXIT_OK),
    (inf_voxel, EXIT_OK), (three_d, EXIT_PARTIAL), (_tr_value("abc"), EXIT_PARTIAL),
    (_tr_value(-2.0), EXIT_PARTIAL), (_tr_value(0), EXIT_PARTIAL), (tr_disagrees, EXIT_OK),
    (mask_other_grid, EXIT_OK), (mask_damaged, EXIT_PARTIAL), (no_brain_mask, EXIT_OK),
    (sidecar_invalid, EXIT_PARTIAL), (sidecar_empty, EXIT_PARTIAL),
    (sidecar_folder, EXIT_PARTIAL), (unrelated_invalid_json, EXIT_OK),
    (derivatives_description_invalid, EXIT_INPUT), (atlas_float, EXIT_ATLAS),
    (atlas_table_missing, EXIT_ATLAS), (atlas_table_no_index, EXIT_ATLAS),
    (atlas_truncated, EXIT_ATLAS), (atlas_4d, EXIT_ATLAS), (label_dotdot, EXIT_USAGE),
    (label_slash, EXIT_USAGE), (label_unknown, EXIT_INPUT), (out_is_file, EXIT_USAGE),
    (out_parent_is_file, EXIT_USAGE), (work_dir_is_file, EXIT_USAGE),
    (filter_unknown_entity, EXIT_USAGE),
]


def assert_good_subjects_written(ds) -> None:
    for sub in ("01", "02"):
        files = subject_files(ds["out"], sub)
        assert sorted(atlas_of(h5) for h5 in files) == sorted(ds["atlases"]), (sub, files)
        for h5 in files:
            with bids_fmristore.open(h5) as f:
                assert f.scan_names == [f"sub-{sub}_task-rest_run-01",
                                        f"sub-{sub}_task-rest_run-02"], h5.name


@pytest.mark.parametrize(("damage", "expected"), CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input(tmp_path, rng, capsys, damage, expected):
    ds = good_dataset(tmp_path, rng)
    defect = damage(ds)
    if defect.out is not None:
        ds["out"] = defect.out
    code, err = run_cli(cli_args(ds, "--min-coverage", "0", *defect.argv), capsys)
    assert code == expected, err
    assert_clean_stderr(err, usage=expected == EXIT_USAGE)
    errors = error_lines(err)
    assert bool(errors) == (expected != EXIT_OK), err
    for line in errors:
        assert any(needle in line for needle in defect.needles), (defect.needles, line)
    if damage in WARNED:
        assert any(any(n in line for n in defect.needles)
                   for line in lines_of(err, "WARNING")), err
    if damage is partly_nan:
        # the count, not a digit of the file's path or name
        named = [" ".join(t for t in w.split() if "/" not in t and "sub-03" not in t)
                 for w in lines_of(err, "WARNING") if _bold(ds).name in w]
        assert any(re.search(r"\b(3|18)\b", line) for line in named), err
    if ds["out"].is_dir():
        assert_outputs_complete(ds["out"])
    if defect.local:
        assert_good_subjects_written(ds)
        scans = [] if expected == EXIT_OK else ["sub-03_task-rest_run-02"]
        for h5 in subject_files(ds["out"], "03"):
            with bids_fmristore.open(h5) as f:
                assert f.scan_names == (scans or [f"sub-03_task-rest_run-0{i}" for i in (1, 2)])
    elif expected in (EXIT_USAGE, EXIT_ATLAS) and ds["out"].is_dir():
        assert list(ds["out"].rglob("*.h5")) == []  # refused before any work


#: Run in a child whose address space is capped: an attempt to allocate (or resample onto) the
#: claimed 2000^3 grid fails there instead of exhausting the shared machine.
_CAPPED = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.RLIM_INFINITY))
from bids_fmristore.cli.run import main
start = time.monotonic()
code = main(sys.argv[1:])
print(f"elapsed {time.monotonic() - start:.3f}", file=sys.stderr)
sys.exit(code)
"""


def test_header_claiming_huge_dimensions_is_refused_quickly(tmp_path, rng):
    """A header claiming 2000x2000x2000x50 over a tiny file: the run fails from its header
    (exit 5, one line naming it) in < 5 s, without allocating the claimed grid."""
    ds = good_dataset(tmp_path, rng)
    huge_dims(ds)
    argv = [str(a) for a in cli_args(ds, "--min-coverage", "0")]
    proc = subprocess.run([sys.executable, "-c", _CAPPED, *argv], capture_output=True,
                          text=True, timeout=120, check=False, cwd=ROOT)
    *lines, last = proc.stderr.rstrip("\n").split("\n")
    err = "\n".join(lines)
    assert last.startswith("elapsed "), proc.stderr
    assert proc.returncode == EXIT_PARTIAL, proc.stderr
    # minutes before the header check; a few seconds now (30 s leaves room for a busy CI)
    assert float(last.split()[1]) < 30.0
    assert_clean_stderr(err)
    errors = error_lines(err)
    assert errors and all(_bold(ds).name in line for line in errors), err
    assert_outputs_complete(ds["out"])
    assert_good_subjects_written(ds)


# -- fmristore files given to export and open() -------------------------------------------------


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One participant + group output: a parcellated file and a LabeledVolumeSet."""
    tmp = tmp_path_factory.mktemp("written")
    ds = good_dataset(tmp, np.random.default_rng(5), subjects=("01",), runs=(1,))
    assert main(cli_args(ds)) == EXIT_OK
    assert main(cli_args(ds, level="group")) == EXIT_OK
    (parcellated,) = [p for p in subject_files(ds["out"], "01") if atlas_of(p) == "A"]
    (labeled,) = (ds["out"] / "group").glob("*_stat-mean_bold.h5")
    return {"parcellated": parcellated, "labeled": labeled}


def _truncated(src: Path, dest: Path) -> Path:
    dest.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dest


def _garbage(src: Path, dest: Path) -> Path:
    content = bytearray(src.read_bytes())
    content[:64] = bytes(range(64))  # the superblock
    dest.write_bytes(bytes(content))
    return dest


@pytest.mark.parametrize("kind", ["parcellated", "labeled"])
@pytest.mark.parametrize("damage", [_truncated, _garbage], ids=["truncated", "superblock"])
def test_export_of_a_corrupted_h5(tmp_path, capsys, written, kind, damage):
    bad = damage(written[kind], tmp_path / f"bad_{written[kind].name}")
    out = tmp_path / "exported"
    code, err = run_cli(["export", bad, out], capsys)
    assert code == EXIT_INPUT, err
    assert_clean_stderr(err)
    (line,) = error_lines(err)
    assert bad.name in line
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("kind", ["parcellated", "labeled"])
def test_open_truncated_h5_raises_format_error(tmp_path, written, kind):
    bad = _truncated(written[kind], tmp_path / f"cut_{written[kind].name}")
    with pytest.raises(FormatError) as info:
        bids_fmristore.open(bad)
    assert bad.name in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["parcellated", "labeled"])
def test_open_h5_without_mask_raises_format_error(tmp_path, written, kind):
    bad = tmp_path / f"nomask_{written[kind].name}"
    shutil.copy(written[kind], bad)
    with h5py.File(bad, "r+") as f:
        del f["mask"]
    with pytest.raises(FormatError) as info:
        bids_fmristore.open(bad)
    assert bad.name in str(info.value) and "mask" in str(info.value)
