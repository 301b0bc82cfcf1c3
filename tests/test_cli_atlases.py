"""Atlas sources through the command line: same summaries from every source, space checks,
resolution picking against nilearn, and pybids indexing of OUTPUT_DIR/atlases."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bids import BIDSLayout
from conftest import SPACE, make_fmriprep_run, make_raw, write_json
from nilearn.maskers import NiftiLabelsMasker
from test_parcellate_vs_nilearn import mni_block_atlas

from bids_fmristore.cli.run import main
from bids_fmristore.formats.multiscan import ParcellatedMultiScan
from bids_fmristore.tables import CONFIG_PATH


@pytest.fixture
def dataset(tmp_path, rng):
    """A 2 mm MNI-grid run over the middle of the brain, and a 1 mm atlas from nilearn's MNI GM."""
    atlas_1mm = mni_block_atlas(tmp_path / "src", step=1)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-40, -60, -20]
    shape = (40, 50, 30)
    make_raw(tmp_path / "bids")
    make_fmriprep_run(tmp_path / "fmriprep", rng.normal(100, 5, (*shape, 6)).astype(np.float32),
                      affine, np.ones(shape, bool))
    return tmp_path, atlas_1mm


def run(tmp_path, *args, out="out") -> int:
    return main([str(tmp_path / "bids"), str(tmp_path / out), "participant", "-d",
                 f"fmriprep={tmp_path / 'fmriprep'}", "--min-coverage", "0", *args])


def summary(tmp_path, out="out"):
    (h5,) = (tmp_path / out).glob("sub-01/func/*_atlas-*.h5")
    with ParcellatedMultiScan(h5) as f:
        return f.summary(f.scan_names[0]), json.loads(h5.with_suffix(".json").read_text())


def bep038(root: Path, image: Path, template=SPACE, res="01") -> Path:
    write_json(root / "dataset_description.json", {"Name": "atlases", "BIDSVersion": "1.11.0",
                                                   "DatasetType": "derivative"})
    write_json(root / "atlas-Blocks_description.json", {"Name": "Blocks"})
    folder = root / f"tpl-{template}"
    folder.mkdir(parents=True)
    stem = f"tpl-{template}_res-{res}_atlas-Blocks_dseg"
    shutil.copy(image, folder / f"{stem}.nii.gz")
    shutil.copy(image.with_name(image.name.replace(".nii.gz", ".tsv")), folder / f"{stem}.tsv")
    return root


def test_every_source_gives_the_same_summaries(dataset, monkeypatch):
    tmp_path, atlas = dataset
    assert run(tmp_path, "--atlas", f"Blocks={atlas}", out="file") == 0
    bep038(tmp_path / "atlasds", atlas)
    assert run(tmp_path, "-d", f"myatlases={tmp_path / 'atlasds'}", "--atlas", "Blocks",
               out="bep038") == 0
    tf = tmp_path / "templateflow"
    bep038(tf, atlas)
    (tf / "dataset_description.json").unlink()
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tf))
    assert run(tmp_path, "--atlas", "Blocks", out="tf") == 0
    ref, _ = summary(tmp_path, "file")
    assert ref.shape[1] > 10
    for out in ("bep038", "tf"):
        got, sidecar = summary(tmp_path, out)
        assert got.equals(ref)
        assert sidecar["Atlas"]["File"].startswith(f"bids:atlases:tpl-{SPACE}/")


def test_space_mismatch_is_an_error_unless_allowed(dataset, caplog, capsys):
    tmp_path, atlas = dataset
    bep038(tmp_path / "atlasds", atlas, template="MNI152NLin6Asym")
    args = ["-d", f"a={tmp_path / 'atlasds'}", "--atlas", "Blocks"]
    assert run(tmp_path, *args) == 4
    err = capsys.readouterr().err
    assert "MNI152NLin6Asym" in err and SPACE in err and "Traceback" not in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["logs"]  # the log, no output
    assert run(tmp_path, *args, "--allow-atlas-space-mismatch", "-v") == 0
    assert "MNI152NLin6Asym" in capsys.readouterr().err  # warned


def test_1mm_atlas_on_2mm_bold_matches_nilearn(dataset):
    tmp_path, atlas = dataset
    assert run(tmp_path, "--atlas", f"Blocks={atlas}") == 0
    got, _ = summary(tmp_path)
    bold = next((tmp_path / "fmriprep").rglob("*preproc_bold.nii.gz"))
    masker = NiftiLabelsMasker(labels_img=str(atlas), mask_img=nib.load(str(bold).replace(
        "desc-preproc_bold", "desc-brain_mask")), resampling_target="data", standardize=None)
    with warnings.catch_warnings():  # labels outside the field of view, as expected
        warnings.filterwarnings("ignore", "After (resampling|applying mask to)", UserWarning)
        expected = masker.fit_transform(str(bold))
    assert got.shape == expected.shape and got.shape[1] > 10
    np.testing.assert_allclose(got.to_numpy(), expected, rtol=1e-5)


def test_closest_resolution_is_used(dataset):
    tmp_path, atlas_1mm = dataset
    atlas_2mm = mni_block_atlas(tmp_path / "src2", step=2)
    root = bep038(tmp_path / "atlasds", atlas_1mm, res="01")
    stem = f"tpl-{SPACE}_res-02_atlas-Blocks_dseg"
    shutil.copy(atlas_2mm, root / f"tpl-{SPACE}" / f"{stem}.nii.gz")
    shutil.copy(atlas_2mm.with_name(atlas_2mm.name.replace(".nii.gz", ".tsv")),
                root / f"tpl-{SPACE}" / f"{stem}.tsv")
    assert run(tmp_path, "-d", f"a={root}", "--atlas", "Blocks") == 0
    _, sidecar = summary(tmp_path)
    assert "_res-02_" in sidecar["Atlas"]["File"]


def test_pybids_indexes_outputs_and_atlases(dataset):
    tmp_path, atlas = dataset
    assert run(tmp_path, "--atlas", f"Blocks={atlas}", "--tsv") == 0
    out = tmp_path / "out"
    layout = BIDSLayout(out, validate=False, config=["bids", "derivatives", str(CONFIG_PATH)])
    (h5,) = layout.get(extension=".h5", atlas="Blocks")
    assert (h5.entities["subject"], h5.entities["space"], h5.entities["atlas"]) == (
        "01", SPACE, "Blocks")
    (series,) = layout.get(stat="mean", suffix="timeseries", extension=".tsv")
    assert series.entities["atlas"] == "Blocks" and series.entities["space"] == SPACE
    dseg = [f for f in layout.get(suffix="dseg", extension=".nii.gz")]
    assert [f.entities["atlas"] for f in dseg] == ["Blocks"]
    assert Path(dseg[0].path).is_relative_to(out / "atlases")
    desc = json.loads((out / "dataset_description.json").read_text())
    _, sidecar = summary(tmp_path)
    rel = sidecar["Atlas"]["File"].split(":", 2)[2]
    assert (Path(desc["DatasetLinks"]["atlases"]) / rel).resolve() == Path(dseg[0].path).resolve()


def test_atlas_sources_under_anat_and_perf_folders(dataset, monkeypatch, capsys):
    # pybids issue 1270: folders named like datatypes above a dataset must not change its names
    tmp_path, atlas = dataset
    assert run(tmp_path, "--atlas", f"Blocks={atlas}", out="file") == 0
    ds = bep038(tmp_path / "perf" / "atlasds", atlas)
    (ds / f"tpl-{SPACE}" / f"tpl-{SPACE}_atlas-Other_dseg.tsv").write_bytes(b"\xff\x00")
    tf = bep038(tmp_path / "anat" / "templateflow", atlas, res="02")
    (tf / "dataset_description.json").unlink()
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tf))
    assert run(tmp_path, "-d", f"myatlases={ds}", "--atlas", "Blocks", out="bep038") == 0
    assert run(tmp_path, "--atlas", "Blocks", out="tf") == 0
    ref, _ = summary(tmp_path, "file")
    for out, res in (("bep038", "01"), ("tf", "02")):
        got, sidecar = summary(tmp_path, out)
        assert got.equals(ref)
        assert sidecar["Atlas"]["File"] == (
            f"bids:atlases:tpl-{SPACE}/tpl-{SPACE}_res-{res}_atlas-Blocks_dseg.nii.gz")

    write_json(ds / "dataset_description.json", {"DatasetType": "derivative",
                                                  "GeneratedBy": {"Name": "x"}})
    capsys.readouterr()
    assert run(tmp_path, "-d", f"myatlases={ds}", "--atlas", "Blocks", out="bad") == 4
    err = capsys.readouterr().err.strip()
    assert str(ds / "dataset_description.json") in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert [p.name for p in (tmp_path / "bad").iterdir()] == ["logs"]  # the log, no output
