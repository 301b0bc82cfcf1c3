"""The HTML reports on a multi-run, multi-atlas dataset with a failed run, denoising on.

The README's example dataset (nibabel's test runs) plus a damaged third run of sub-01 and a
second atlas; the pages are checked as files (references, names, images) and rendered in
headless Chromium.
"""

from __future__ import annotations

import html.parser
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bids_fmristore.cli.run import main
from bids_fmristore.example import build_example
from bids_fmristore.report import figures

SPACE = "MNI152NLin2009cAsym"
GOOD_RUNS = {"01": ["sub-01_task-rest_run-01", "sub-01_task-rest_run-02"],
             "02": ["sub-02_task-rest_run-01"]}
BROKEN = f"sub-01_task-rest_run-03_space-{SPACE}_desc-preproc_bold.nii.gz"
ATLASES = ("Demo", "Coarse")


def _coarse_atlas(demo: Path, dest: Path) -> Path:
    """Pairs of Demo labels merged, with a network column (alternating A/B)."""
    img = nib.load(demo)
    labels = np.asanyarray(img.dataobj).astype(np.int16)
    coarse = np.where(labels > 0, (labels + 1) // 2, 0).astype(np.int16)
    out = dest / "atlas-Coarse_dseg.nii.gz"
    nib.save(nib.Nifti1Image(coarse, img.affine, img.header), out)
    rows = [f"{i}\tCoarse{i:02d}\t{'AB'[i % 2]}" for i in range(1, int(coarse.max()) + 1)]
    out.with_name("atlas-Coarse_dseg.tsv").write_text(
        "\n".join(["index\tname\tnetwork_label", *rows]) + "\n")
    return out


def _add_broken_run(fmriprep: Path) -> None:
    """sub-01 run-03: a copy of run-01 whose BOLD stream is cut in half."""
    func = fmriprep / "sub-01" / "func"
    for src in sorted(func.glob("sub-01_task-rest_run-01_*")):
        dst = func / src.name.replace("run-01", "run-03")
        shutil.copyfile(src, dst)
    bold = func / BROKEN
    data = bold.read_bytes()
    bold.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    paths = build_example(root / "example")
    coarse = _coarse_atlas(paths.atlas, paths.atlas.parent)
    _add_broken_run(paths.fmriprep)
    out = root / "example" / "out"
    argv = [str(paths.bids), str(out), "participant", "-d", f"fmriprep={paths.fmriprep}",
            "--atlas", f"Demo={paths.atlas}", f"Coarse={coarse}",
            "--confounds", "trans_x", "trans_y", "rot_z"]
    assert main(argv) == 5  # the damaged run fails alone; sub-02's run is too short to denoise
    assert main([str(paths.bids), str(out), "group"]) == 0
    return {"out": out, "paths": paths, "argv": argv}


class _Refs(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str]] = []
        self.ids: set[str] = set()
        self.imgs: list[str] = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("src", "href", "action", "poster", "data"):
                self.refs.append((tag, value or ""))
            if key == "id":
                self.ids.add(value)
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])


def _parse(page: Path) -> _Refs:
    parser = _Refs()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def _pages(out: Path) -> list[Path]:
    return [out / "sub-01.html", out / "sub-02.html", out / "group.html"]


def test_a_page_per_subject_and_one_for_the_group(dataset):
    out = dataset["out"]
    assert sorted(p.name for p in out.glob("*.html")) == ["group.html", "sub-01.html",
                                                          "sub-02.html"]
    for page in _pages(out):
        assert page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    # written atomically: no temporaries left beside the pages or the figures
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name.startswith(".bids_f")]


def test_every_local_reference_resolves_inside_output_dir(dataset):
    out = dataset["out"].resolve()
    for page in _pages(out):
        text = page.read_text(encoding="utf-8")
        assert "://" not in text and "url(" not in text, page.name
        parsed = _parse(page)
        assert parsed.refs, page.name
        for _tag, ref in parsed.refs:
            assert not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", ref), (page.name, ref)
            assert not ref.startswith("//") and not ref.startswith("/"), (page.name, ref)
            if ref.startswith("#"):
                assert ref[1:] in parsed.ids, (page.name, ref)
                continue
            target = (page.parent / unquote(ref)).resolve()
            assert target.is_file(), (page.name, ref)
            assert out in target.parents, (page.name, ref)


def test_pages_still_work_when_output_dir_is_copied(dataset, tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(dataset["out"], copy)
    for page in _pages(copy):
        for src in _parse(page).imgs:
            assert (page.parent / unquote(src)).resolve().is_file()


def test_every_run_atlas_and_failed_run_is_named(dataset):
    out = dataset["out"]
    for sub, runs in GOOD_RUNS.items():
        text = (out / f"sub-{sub}.html").read_text(encoding="utf-8")
        for run in runs:
            assert run in text
        for atlas in ATLASES:
            assert f"atlas {atlas}</h3>" in text
        assert f"sub-{sub}_task-rest_run-01 · Coarse" in text
        assert "grouped by network (green lines)" in text  # Coarse's table has network_label
    sub01 = (out / "sub-01.html").read_text(encoding="utf-8")
    failed = sub01[sub01.index('id="failed"'):sub01.index('id="inputs"')]
    assert BROKEN in failed and "truncated or damaged" in failed
    # sub-02's run is in its data files but could not be denoised: listed with the reason
    sub02 = (out / "sub-02.html").read_text(encoding="utf-8")
    failed = sub02[sub02.index('id="failed"'):sub02.index('id="inputs"')]
    assert "sub-02_task-rest_run-01" in failed and "cannot denoise" in failed
    group = (out / "group.html").read_text(encoding="utf-8")
    for runs in GOOD_RUNS.values():
        for run in runs:
            assert run in group
    assert BROKEN in group
    for atlas in ATLASES:
        assert f"Atlas {atlas}: mean over" in group


def test_header_has_command_versions_inputs_and_time(dataset):
    text = (dataset["out"] / "sub-01.html").read_text(encoding="utf-8")
    assert "--confounds trans_x trans_y rot_z" in text
    assert re.search(r"nilearn \d+\.\d+", text) and re.search(r"h5py \d+\.\d+", text)
    assert re.search(r"time taken [0-9.]+ s", text)
    sidecar = json.loads((dataset["out"] / "sub-01/func" /
                          f"sub-01_space-{SPACE}_atlas-Demo_bold.json").read_text())
    for uri in sidecar["Sources"]:
        assert uri in text


def _colours(rgb: np.ndarray) -> int:
    """Number of distinct colours of an (H, W, 3) uint8 image."""
    packed = rgb.astype(np.uint32)
    return int(np.unique((packed[..., 0] << 16) | (packed[..., 1] << 8) | packed[..., 2]).size)


def _image_stats(path: Path) -> tuple[float, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        rgb = np.asarray(img.convert("RGB"))
    assert rgb.shape[0] > 50 and rgb.shape[1] > 50
    return float(rgb.std()), _colours(rgb)


def test_figures_exist_and_are_non_empty_images(dataset):
    out = dataset["out"]
    for page in _pages(out):
        imgs = _parse(page).imgs
        for src in imgs:
            std, colours = _image_stats(page.parent / unquote(src))
            assert std > 0 and colours >= 4, src
    sub01 = _parse(out / "sub-01.html").imgs
    # per atlas: outline + coverage; per run and atlas: carpet + denoised correlation; tSNR
    assert len(sub01) == len(ATLASES) * (2 + 2 * 2) + 2
    assert all(s.startswith("sub-01/figures/") for s in sub01)
    assert all(s.startswith("group/figures/") for s in _parse(out / "group.html").imgs)


def test_no_report_writes_no_page(dataset, tmp_path):
    out = tmp_path / "out"
    argv = dataset["argv"][:1] + [str(out)] + dataset["argv"][2:]
    assert main(argv + ["--no-report", "--participant-label", "02"]) == 5
    assert (out / f"sub-02/func/sub-02_space-{SPACE}_atlas-Demo_bold.h5").is_file()
    assert not list(out.glob("*.html")) and not (out / "sub-02" / "figures").exists()


def test_reports_only_rebuilds_from_outputs_without_bold(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(dataset["out"], out)
    for page in out.glob("*.html"):
        page.unlink()
    shutil.rmtree(out / "sub-01" / "figures")
    data = {p: p.stat().st_mtime_ns for p in out.rglob("*.h5")}
    bids = dataset["paths"].bids
    # no BOLD to read: the fMRIPrep folder is not even given
    assert main([str(bids), str(out), "participant", "--reports-only"]) == 0
    assert main([str(bids), str(out), "group", "--reports-only"]) == 0
    assert sorted(p.name for p in out.glob("*.html")) == ["group.html", "sub-01.html",
                                                          "sub-02.html"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.h5")} == data
    text = (out / "sub-01.html").read_text(encoding="utf-8")
    assert "sub-01_task-rest_run-02 · Demo" in text and BROKEN in text
    assert "--confounds trans_x" in text  # the participant run's command, from its log
    assert "2 report(s) rebuilt" in capsys.readouterr().err


def test_reports_only_errors_are_one_line(dataset, tmp_path, capsys):
    bids = str(dataset["paths"].bids)
    assert main([bids, str(tmp_path / "none"), "participant", "--reports-only"]) == 3
    assert main([bids, str(dataset["out"]), "participant", "--reports-only",
                 "--no-report"]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([bids, str(empty), "group", "--reports-only"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"bids_fmristore: ERROR: OUTPUT_DIR {tmp_path / 'none'} does not exist: run the "
        "participant level first",
        "bids_fmristore: ERROR: --reports-only and --no-report contradict each other",
        f"bids_fmristore: ERROR: {empty} holds no participant outputs "
        "(sub-*/func/*_bold.json): run the participant level first",
    ]
    assert "Traceback" not in "\n".join(err)


def test_a_report_failure_is_a_warning_and_the_data_stand(dataset, tmp_path, capsys,
                                                          monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("figure exploded")

    monkeypatch.setattr(figures, "carpet", broken)
    out = tmp_path / "out"
    argv = dataset["argv"][:1] + [str(out)] + dataset["argv"][2:]
    assert main(argv + ["--participant-label", "01"]) == 5  # as without reports
    err = capsys.readouterr().err
    assert ("WARNING: sub-01: report not written (RuntimeError: figure exploded); its data "
            "files are complete") in err
    assert "Traceback" not in err
    assert not (out / "sub-01.html").exists()
    assert (out / f"sub-01/func/sub-01_space-{SPACE}_atlas-Coarse_bold.h5").is_file()


def _screenshot(page: Path, png: Path) -> None:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed (.ci/run installs it: apt-get install chromium)"
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--no-first-run", f"--user-data-dir={png.parent / 'profile'}",
         f"--screenshot={png}", "--window-size=1100,1600", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and png.is_file(), proc.stderr[-2000:]


@pytest.mark.parametrize("name", ["sub-01.html", "sub-02.html", "group.html"])
def test_pages_render_in_headless_chromium(dataset, tmp_path, name):
    png = tmp_path / "shot.png"
    _screenshot(dataset["out"] / name, png)
    with Image.open(png) as img:
        rgb = np.asarray(img.convert("RGB"))
    assert rgb.shape[:2] == (1600, 1100)
    assert rgb.std() > 10 and _colours(rgb) > 50
    # the header band is drawn (dark blue), so the page's inline CSS was applied
    assert np.allclose(rgb[10, 550], (0x24, 0x41, 0x5E), atol=3)


def test_store_full_files_still_get_a_page(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    argv = dataset["argv"][:1] + [str(out)] + dataset["argv"][2:]
    assert main(argv + ["--store", "full", "--participant-label", "01"]) == 5
    assert "report not written" not in capsys.readouterr().err
    text = (out / "sub-01.html").read_text(encoding="utf-8")
    assert "stored without parcel means (--store full)" in text
    assert "sub-01_task-rest_run-01 · tSNR" in text  # the voxel maps do not depend on --store


def _group_row(out: Path, sub: str) -> list[str]:
    text = (out / "group.html").read_text(encoding="utf-8")
    row = re.search(rf'<tr[^>]*><td><a href="sub-{sub}.html">sub-{sub}</a></td>(.*?)</tr>',
                    text).group(1)
    return re.findall(r"<td>(.*?)</td>", row)


def test_group_mean_tsnr_and_fd_match_nibabel_and_pandas(dataset):
    fmriprep = dataset["paths"].fmriprep / "sub-01" / "func"
    tsnr_sum, tsnr_n, fds = None, None, []
    for run in ("run-01", "run-02"):  # run-03 is the damaged one: in no file
        stem = f"sub-01_task-rest_{run}"
        bold = nib.load(fmriprep / f"{stem}_space-{SPACE}_desc-preproc_bold.nii.gz").get_fdata()
        mask = np.asanyarray(nib.load(
            fmriprep / f"{stem}_space-{SPACE}_desc-brain_mask.nii.gz").dataobj) > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            tsnr = np.where(mask, bold.mean(axis=3) / bold.std(axis=3), np.nan)
        ok = np.isfinite(tsnr)
        tsnr_sum = np.where(ok, tsnr, 0) + (0 if tsnr_sum is None else tsnr_sum)
        tsnr_n = ok.astype(int) + (0 if tsnr_n is None else tsnr_n)
        table = pd.read_csv(fmriprep / f"{stem}_desc-confounds_timeseries.tsv", sep="\t",
                            na_values="n/a")
        fds.append(table["framewise_displacement"].mean())
    with np.errstate(invalid="ignore", divide="ignore"):
        average = (tsnr_sum / tsnr_n)[tsnr_n > 0]
    runs, failed, tsnr_cell, fd_cell, _ = _group_row(dataset["out"], "01")
    assert (runs, failed) == ("2", "1")
    assert float(tsnr_cell) == pytest.approx(np.mean(average), abs=0.051)
    assert float(fd_cell) == pytest.approx(np.mean(fds), abs=0.0006)


def test_a_rerun_that_keeps_every_file_keeps_the_page(tmp_path):
    """Pages are redrawn for subjects whose files changed (or that have none): a plain rerun
    that keeps everything leaves them as they are; --overwrite redraws them."""
    paths = build_example(tmp_path / "example")
    out = tmp_path / "out"
    argv = [str(paths.bids), str(out), "participant", "-d", f"fmriprep={paths.fmriprep}",
            "--atlas", f"Demo={paths.atlas}", "--participant-label", "01", "-q"]
    assert main(argv) == 0
    page = out / "sub-01.html"
    first = page.stat().st_mtime_ns
    assert main(argv) == 0  # every file kept
    assert page.stat().st_mtime_ns == first
    page.unlink()
    assert main(argv) == 0  # kept files, but no page: it is written
    assert page.is_file()
    second = page.stat().st_mtime_ns
    assert main(argv + ["--overwrite"]) == 0
    assert page.stat().st_mtime_ns > second
