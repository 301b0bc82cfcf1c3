"""Discovery on datasets as they come: odd locations, symlinks, bad sidecars, odd TRs, filters."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import SPACE, make_atlas, make_fmriprep_run, make_raw, random_labels, write_json

from bids_fmristore.cli.run import main
from bids_fmristore.errors import EXIT_OK, EXIT_USAGE, InputError, UsageError
from bids_fmristore.inputs.discovery import discover

SHAPE = (3, 4, 3)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
FUNC = "sub-01/func"
STEM = f"sub-01_task-rest_run-01_space-{SPACE}"
BOLD = f"{STEM}_desc-preproc_bold.nii.gz"
MASK = f"{STEM}_desc-brain_mask.nii.gz"


pytestmark = pytest.mark.usefixtures("package_logs_reach_caplog")


def fmriprep_run(root: Path, **kwargs) -> Path:
    data = np.full((*SHAPE, 4), 100, np.float32)
    return make_fmriprep_run(root, data, AFFINE, np.ones(SHAPE, bool), **kwargs)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# -- pybids #1270: entity-like folder names above the dataset root ----------------------------


@pytest.mark.parametrize("parent", ["perf", "motion", "sub-99/ses-2/anat"])
def test_dataset_under_entity_named_folder(tmp_path, parent):
    base = tmp_path / parent
    bids = make_raw(base / "bids", subjects=("01", "02"))
    fmriprep = base / "ds"
    bold = fmriprep_run(fmriprep, tr=1.5)

    raw_runs = discover(bids).runs
    assert [(r.subject, r.tr, r.space, r.mask) for r in raw_runs] == [
        ("01", 2.0, None, None), ("02", 2.0, None, None)]
    assert raw_runs[0].uri() == "bids:raw:sub-01/func/sub-01_task-rest_run-01_bold.nii.gz"
    assert "session" not in raw_runs[0].entities

    found = discover(bids, derivatives={"fmriprep": fmriprep}, participants=["01"])
    (run,) = found.runs
    assert run.path == bold and run.tr == 1.5 and run.space == SPACE
    assert run.entities == {"subject": "01", "task": "rest", "run": "01", "space": SPACE,
                            "desc": "preproc"}
    assert run.uri() == f"bids:fmriprep:{FUNC}/{BOLD}"
    assert run.uri(run.mask, run.mask_dataset) == f"bids:fmriprep:{FUNC}/{MASK}"
    assert found.problems == []


# -- symlinks: URIs come from the path as the dataset names it --------------------------------


def annex(root: Path, keep=("dataset_description.json",)) -> dict[str, Path]:
    """Turn every file into a git-annex style relative symlink; return link → object."""
    objects = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and ".git" not in p.parts):
        if path.name in keep:
            continue
        key = f"SHA256E-s{path.stat().st_size}--{abs(hash(path.name)):x}{''.join(path.suffixes)}"
        obj = root / ".git" / "annex" / "objects" / "Xk" / "9p" / key / key
        obj.parent.mkdir(parents=True)
        shutil.move(path, obj)
        path.symlink_to(os.path.relpath(obj, path.parent))
        objects[path] = obj
    return objects


def test_git_annex_dataset_uris_stay_in_the_dataset(tmp_path):
    fmriprep = tmp_path / "fmriprep"
    bold = fmriprep_run(fmriprep, tr=2.5)
    objects = annex(fmriprep)
    assert bold.is_symlink() and ".git/annex/objects" in str(bold.resolve())
    bids = make_raw(tmp_path / "bids")

    (run,) = discover(bids, derivatives={"fmriprep": fmriprep}).runs
    assert run.path == bold and run.tr == 2.5
    assert run.uri() == f"bids:fmriprep:{FUNC}/{BOLD}"
    assert run.mask == fmriprep / FUNC / MASK
    assert run.uri(run.mask, run.mask_dataset) == f"bids:fmriprep:{FUNC}/{MASK}"

    sidecar = bold.with_suffix("").with_suffix(".json")
    shutil.move(objects[bold], tmp_path / "kept")  # content dropped (`datalad drop`)
    found = discover(bids, derivatives={"fmriprep": fmriprep})
    assert found.runs == []
    (line,) = found.problems
    assert line.startswith(f"{bold}: symlink target ../../.git/annex/objects/")
    assert line.endswith(" is missing (content not retrieved? e.g. `datalad get` it)")

    shutil.move(tmp_path / "kept", objects[bold])
    objects[sidecar].unlink()  # now the sidecar's content is missing
    (line,) = discover(bids, derivatives={"fmriprep": fmriprep}).problems
    assert line.startswith(f"{sidecar}: symlink target ../../.git/annex/objects/")


def test_bold_linked_from_outside_its_dataset(tmp_path):
    fmriprep, shared = tmp_path / "fmriprep", tmp_path / "shared"
    bold = fmriprep_run(fmriprep)
    mask = bold.parent / MASK
    shared.mkdir()
    for path in (bold, mask):
        shutil.move(path, shared / path.name)
        path.symlink_to(shared / path.name)

    bids = make_raw(tmp_path / "bids")
    (run,) = discover(bids, derivatives={"fmriprep": tmp_path / "fmriprep"}).runs
    assert run.path == bold
    assert run.uri() == f"bids:fmriprep:{FUNC}/{BOLD}"
    assert run.uri(run.mask, run.mask_dataset) == f"bids:fmriprep:{FUNC}/{MASK}"


def test_dataset_reached_through_a_symlinked_folder(tmp_path, monkeypatch):
    real = tmp_path / "storage" / "fmriprep"
    fmriprep_run(real)
    bids = make_raw(tmp_path / "bids")
    link = tmp_path / "fmriprep"
    link.symlink_to(real, target_is_directory=True)

    found = discover(bids, derivatives={"fmriprep": link})
    (run,) = found.runs
    assert run.dataset.root == link and run.path == link / FUNC / BOLD
    assert run.uri() == f"bids:fmriprep:{FUNC}/{BOLD}"
    assert run.uri(real / FUNC / BOLD) == f"bids:fmriprep:{FUNC}/{BOLD}"
    assert run.mask == link / FUNC / MASK

    monkeypatch.chdir(tmp_path)  # a relative dataset path is made absolute, not resolved
    (run,) = discover(Path("fmriprep")).runs
    assert run.path == link / FUNC / BOLD and run.uri() == f"bids:raw:{FUNC}/{BOLD}"


def test_cli_sources_of_annexed_dataset(tmp_path):
    bids, fmriprep = make_raw(tmp_path / "bids"), tmp_path / "fmriprep"
    fmriprep_run(fmriprep)
    annex(fmriprep)
    atlas = make_atlas(tmp_path / "atlas", random_labels(SHAPE, 3, np.random.default_rng(0)),
                       AFFINE, name="Demo")
    out = tmp_path / "out"
    code = main([str(bids), str(out), "participant", "--atlas", f"Demo={atlas}",
                 "-d", f"fmriprep={fmriprep}"])
    assert code == EXIT_OK
    meta = json.loads(next(out.rglob("*_atlas-Demo_bold.json")).read_text())
    assert {f"bids:fmriprep:{FUNC}/{BOLD}", f"bids:fmriprep:{FUNC}/{MASK}"} <= set(
        meta["Sources"])


# -- malformed metadata -----------------------------------------------------------------------


def subjects(tmp_path, n: int = 2) -> tuple[Path, list[Path]]:
    """fMRIPrep derivatives with one run in each of sub-01 … sub-0n."""
    fmriprep = tmp_path / "fmriprep"
    return fmriprep, [fmriprep_run(fmriprep, sub=f"{i:02d}") for i in range(1, n + 1)]


def sidecar_of(bold: Path) -> Path:
    return bold.with_name(bold.name.replace(".nii.gz", ".json"))


BAD_SIDECARS = [
    (b"", "(empty file)"),
    (b'{"RepetitionTime": 2.0,', "(Expecting property name enclosed in double quotes"),
    (b'{"TaskName": "r\xe9st"}', "(not UTF-8: invalid continuation byte at byte 15)"),
    (b"[2.0]", "(expected an object, got list)"),
    (None, "(a folder, not a file)"),
]


def test_bad_sidecar_fails_only_its_run(tmp_path):
    """sub-01 is fine; each other subject's sidecar is broken in its own way."""
    fmriprep, bolds = subjects(tmp_path, 1 + len(BAD_SIDECARS))
    expected = []
    for bold, (content, reason) in zip(bolds[1:], BAD_SIDECARS, strict=True):
        bad = sidecar_of(bold)
        bad.unlink()
        if content is None:
            bad.mkdir()
        else:
            bad.write_bytes(content)
        expected.append(f"{bad}: invalid JSON sidecar {reason}")

    found = discover(fmriprep)
    assert [r.path for r in found.runs] == bolds[:1]
    assert len(found.problems) == len(expected)
    for line, start in zip(found.problems, expected, strict=True):
        assert line.startswith(start), line


def test_bad_json_outside_the_inheritance_chain_is_ignored(tmp_path):
    fmriprep, bolds = subjects(tmp_path)
    func = bolds[0].parent
    confounds = func / "sub-01_task-rest_run-01_desc-confounds_timeseries"
    confounds.with_suffix(".tsv").write_text("a\n1\n")
    confounds.with_suffix(".json").write_text("")  # left by an interrupted job
    (fmriprep / "task-motor_bold.json").write_text("{")  # another task
    (fmriprep / "sub-01" / "sub-01_task-rest_run-02_bold.json").write_text("{")  # another run
    (func / ".sub-01_task-rest_bold.json").write_text("{")  # hidden
    found = discover(fmriprep)
    assert [r.path for r in found.runs] == bolds and found.problems == []


def test_bad_top_level_sidecar_fails_every_run_that_inherits_it(tmp_path):
    bids = make_raw(tmp_path / "bids", subjects=("01", "02"), tasks=("rest", "motor"))
    top = bids / "task-rest_bold.json"
    top.write_text("{")
    found = discover(bids)
    assert [r.entities["task"] for r in found.runs] == ["motor", "motor"]
    assert len(found.problems) == 2
    assert all(line.startswith(f"{top}: invalid JSON sidecar (") for line in found.problems)


def test_sidecar_inheritance_more_specific_wins(tmp_path):
    bids = make_raw(tmp_path / "bids", subjects=("01", "02"), sessions=("1",), runs=(1, 2))
    write_json(bids / "task-rest_bold.json", {"RepetitionTime": 3.0})
    write_json(bids / "sub-02" / "sub-02_task-rest_bold.json", {"RepetitionTime": 1.25})
    write_json(bids / "sub-02" / "sub-02_task-rest_run-2_bold.json", {"RepetitionTime": 0.5})
    for sidecar in bids.rglob("sub-*_bold.json"):  # per-run sidecars drop their TR
        if sidecar.parent.name == "func":
            write_json(sidecar, {"TaskName": "rest"})
    write_json(bids / "sub-01/ses-1/func/sub-01_ses-1_task-rest_run-02_bold.json",
               {"RepetitionTime": 2.0, "TaskName": "rest"})
    trs = {(r.subject, int(r.entities["run"])): r.tr for r in discover(bids).runs}
    assert trs == {("01", 1): 3.0, ("01", 2): 2.0, ("02", 1): 1.25, ("02", 2): 0.5}


def test_bad_dataset_description_is_one_input_error(tmp_path):
    fmriprep, _ = subjects(tmp_path, 1)
    desc = fmriprep / "dataset_description.json"
    for content, reason in ((b"", "invalid JSON"), (b"\xff{}", "invalid JSON"),
                            (b"[]", "invalid dataset description")):
        desc.write_bytes(content)
        with pytest.raises(InputError) as err:
            discover(fmriprep)
        assert one_line(err).startswith(f"{desc}: {reason}")
    desc.unlink()
    desc.symlink_to(".git/annex/objects/Xk/9p/KEY/KEY")
    with pytest.raises(InputError) as err:
        discover(fmriprep)
    assert type(err.value) is InputError
    assert one_line(err).startswith(f"{desc}: symlink target .git/annex/objects/Xk/9p/KEY/KEY "
                                    "is missing")


def test_byte_order_mark_is_tolerated(tmp_path):
    fmriprep, bolds = subjects(tmp_path)
    sidecar_of(bolds[0]).write_bytes(b"\xef\xbb\xbf" + b'{"RepetitionTime": 0.8}')
    assert [r.tr for r in discover(fmriprep).runs] == [0.8, 2.0]


# -- repetition time and dimensions -----------------------------------------------------------


BAD_TRS = ["2.0", [2.0], None, 0, -1.5, True]  # string, list, null, zero, negative, bool


def test_invalid_json_repetition_time(tmp_path):
    fmriprep, bolds = subjects(tmp_path, 1 + len(BAD_TRS))
    for bold, value in zip(bolds[1:], BAD_TRS, strict=True):
        write_json(sidecar_of(bold), {"RepetitionTime": value})
    found = discover(fmriprep)
    assert [r.path for r in found.runs] == bolds[:1]
    assert found.problems == [
        f"{sidecar_of(bold)}: invalid RepetitionTime {json.dumps(value)} (expected a positive "
        "number of seconds)" for bold, value in zip(bolds[1:], BAD_TRS, strict=True)]


def with_pixdim(bold: Path, pixdim: float) -> None:
    img = nib.load(bold)
    img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)
    img.header["pixdim"][4] = pixdim
    nib.save(img, bold)
    write_json(sidecar_of(bold), {"TaskName": "rest"})


def test_bad_headers(tmp_path):
    fmriprep, bolds = subjects(tmp_path, 5)
    with_pixdim(bolds[1], 0.0)
    with_pixdim(bolds[2], -2.0)
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), AFFINE), bolds[3])
    bolds[4].write_bytes(b"not a nifti")
    found = discover(fmriprep)
    assert [r.path for r in found.runs] == bolds[:1]
    assert found.problems[:3] == [
        f"{bolds[1]}: no RepetitionTime in the JSON sidecar or the header (pixdim[4] = 0)",
        f"{bolds[2]}: no RepetitionTime in the JSON sidecar and an invalid one in the header "
        "(pixdim[4] = -2)",
        f"{bolds[3]}: is 3-D; expected a 4-D BOLD series",
    ]
    assert found.problems[3].startswith(f"{bolds[4]}: cannot read NIfTI header (")


def test_several_files_for_one_run(tmp_path):
    bids, fmriprep, other = make_raw(tmp_path / "bids"), tmp_path / "fmriprep", tmp_path / "other"
    kept = fmriprep_run(fmriprep, run=2)
    bold = fmriprep_run(fmriprep)
    img = nib.load(bold)
    nib.save(img, bold.with_suffix(""))  # the same run as .nii and .nii.gz
    fmriprep_run(other, run=2, sub="01")  # the same run in a second dataset
    found = discover(bids, derivatives={"fmriprep": fmriprep})
    assert [r.path for r in found.runs] == [kept]
    assert found.problems == [
        f"{bold.with_suffix('')}: 2 BOLD files for one run (bids:fmriprep:{FUNC}/{BOLD[:-3]}, "
        f"bids:fmriprep:{FUNC}/{BOLD}); none is used: remove all but one, or select one with "
        "--bids-filter-file"]
    found = discover(bids, derivatives={"fmriprep": fmriprep, "other": other},
                     filters={"bold": {"extension": ".nii.gz"}})
    assert [r.path for r in found.runs] == [bold]
    (line,) = found.problems
    assert line.startswith(f"{kept}: 2 BOLD files for one run (bids:fmriprep:")
    assert f"bids:other:{FUNC}/{kept.name})" in line


# -- --bids-filter-file -----------------------------------------------------------------------


@pytest.mark.parametrize(("filters", "needles"), [
    ({"bold": {"acquisiton": "x"}},
     ["unknown entity 'acquisiton' in query 'bold'", "did you mean 'acquisition'?",
      "valid entities: ", "subject", "desc"]),
    ({"mask": {"fancy": "x"}}, ["unknown entity 'fancy' in query 'mask'", "valid entities: "]),
    ({"bolt": {"run": 1}}, ["unknown query 'bolt' (valid queries: bold, mask)"]),
    ({"bold": ["run"]}, ["query 'bold' must be an object"]),
    ({"bold": {"run": {"gt": 1}}}, ['bold.run = {"gt": 1}: expected a string, a number']),
], ids=["typo", "mask", "query", "not-object", "dict-value"])
def test_bad_filters_are_usage_errors(tmp_path, filters, needles):
    fmriprep, _ = subjects(tmp_path, 1)
    with pytest.raises(UsageError) as err:
        discover(fmriprep, filters=filters)
    message = one_line(err)
    assert message.startswith("--bids-filter-file: ")
    for needle in needles:
        assert needle in message


def test_filter_on_entity_no_file_has(tmp_path):
    fmriprep, _ = subjects(tmp_path)
    # valid BIDS entities, just absent: null matches all, a value matches none
    assert len(discover(fmriprep, filters={"bold": {"acquisition": None, "echo": None}}).runs) == 2
    with pytest.raises(InputError, match="no BOLD run matches") as caught:
        discover(fmriprep, filters={"bold": {"acquisition": "x"}})
    assert "'acquisition': 'x'" in str(caught.value)  # the filter that selected nothing
    bids = make_raw(tmp_path / "bids")
    (run,) = discover(bids, filters={"bold": {"desc": None}}).runs  # desc: derivatives only
    assert run.space is None


def test_cli_unknown_filter_entity_exits_2(tmp_path, capsys):
    fmriprep, _ = subjects(tmp_path, 1)
    atlas = make_atlas(tmp_path / "atlas", random_labels(SHAPE, 3, np.random.default_rng(0)),
                       AFFINE, name="Demo")
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"bold": {"acquisiton": "x"}}))
    code = main([str(fmriprep), str(tmp_path / "out"), "participant", "--atlas",
                 f"Demo={atlas}", "--bids-filter-file", str(filters)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "unknown entity 'acquisiton'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# -- raw input --------------------------------------------------------------------------------


def test_raw_runs_native_space_one_warning(tmp_path, caplog):
    bids = make_raw(tmp_path / "bids", subjects=("01", "02"), runs=(1, 2))
    # not raw BIDS: a template-space BOLD left in a raw dataset is not a raw run
    func = bids / FUNC
    shutil.copy(func / "sub-01_task-rest_run-01_bold.nii.gz",
                func / f"sub-01_task-rest_run-03_space-{SPACE}_bold.nii.gz")
    with caplog.at_level(logging.WARNING):
        runs = discover(bids, validate=False).runs
    assert len(runs) == 4
    assert all(r.space is None and r.mask is None and "space" not in r.entities for r in runs)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "mask" in r.getMessage()]
    assert warnings == [f"{bids}: 4 raw BOLD run(s) have no brain mask (raw BIDS input: "
                        "sub-01_task-rest_run-01_bold.nii.gz, sub-01_task-rest_run-02_bold.nii.gz, "
                        "sub-02_task-rest_run-01_bold.nii.gz and 1 more); every voxel inside the "
                        "atlas is used"]


# -- what is not indexed ----------------------------------------------------------------------


def fake_output(folder: Path, source: Path, name: str = "sub-01_task-rest_run-01_bold.nii.gz"
                ) -> Path:
    """A BOLD-named file in an output folder: it must never be taken as input."""
    write_json(folder / "dataset_description.json",
               {"Name": "out", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "bids_fmristore"}]})
    path = folder / FUNC / name
    path.parent.mkdir(parents=True)
    shutil.copy(source, path)
    return path


def test_derivatives_folder_of_raw_dataset_is_not_indexed(tmp_path):
    bids = make_raw(tmp_path / "bids")
    fake_output(bids / "derivatives" / "bids_fmristore", next(bids.rglob("*_bold.nii.gz")))
    fmriprep = bids / "derivatives" / "fmriprep"
    bold = fmriprep_run(fmriprep)
    (run,) = discover(bids, validate=False).runs
    assert run.path == bids / FUNC / "sub-01_task-rest_run-01_bold.nii.gz"
    (run,) = discover(bids, derivatives={"fmriprep": fmriprep}).runs
    assert run.path == bold


def test_exclude_output_inside_a_dataset(tmp_path):
    fmriprep = tmp_path / "fmriprep"
    bold = fmriprep_run(fmriprep)
    top = fake_output(fmriprep / "parcellated", bold, BOLD)
    (run,) = discover(fmriprep).runs  # top-level folders other than sub-* are never indexed
    assert run.path == bold and top.exists()
    out = fmriprep / "sub-01" / "parcellated"
    fake = fake_output(out, bold, BOLD)
    (line,) = discover(fmriprep).problems  # why it matters: the output is seen as input
    assert f"bids:raw:sub-01/parcellated/{FUNC}/{BOLD}" in line and fake.exists()
    (run,) = discover(fmriprep, exclude=[out]).runs
    assert run.path == bold
    unnormalized = fmriprep / "sub-01" / ".." / "sub-01" / "parcellated"
    (run,) = discover(fmriprep, exclude=[tmp_path / "elsewhere", unnormalized]).runs
    assert run.path == bold
    assert discover(fmriprep, exclude=[fmriprep]).problems == [line]  # never the whole dataset


def test_database_is_per_dataset_root(tmp_path):
    db = tmp_path / "db"
    first, second = tmp_path / "a" / "fmriprep", tmp_path / "b" / "fmriprep"
    fmriprep_run(first, tr=1.0)
    fmriprep_run(second, tr=3.0)
    assert [r.tr for r in discover(first, database_dir=db).runs] == [1.0]
    assert [r.tr for r in discover(first, database_dir=db).runs] == [1.0]  # reused
    assert [r.tr for r in discover(second, database_dir=db).runs] == [3.0]
    assert len(list(db.rglob("*.sqlite"))) == 2
