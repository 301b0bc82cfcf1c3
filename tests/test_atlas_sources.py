"""Atlas sources: a file, a BIDS atlas dataset (-d) and a local TemplateFlow cache."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import SPACE, write_json

from bids_fmristore.atlas import load_atlas, table_path_for
from bids_fmristore.atlas.publish import publish_atlas
from bids_fmristore.atlas.request import AtlasRequest, parse_atlas_arg
from bids_fmristore.atlas.sources import ALLOW_MISMATCH_FLAG, find_atlas
from bids_fmristore.atomic import PARTIAL_MARK
from bids_fmristore.errors import AtlasError

NILEARN_GM = Path(__import__("nilearn").__file__).parent / "datasets" / "data" / (
    "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
OTHER = "MNI152NLin6Asym"
TF_STEM = f"tpl-{SPACE}_res-02_atlas-Demo_desc-100Parcels_dseg"


def _block_labels(step: int) -> nib.Nifti1Image:
    """nilearn's MNI grey-matter map at ``step`` mm cut into 12 mm blocks (same blocks at any
    step, so the 1 mm and 2 mm images are one atlas)."""
    img = nib.load(NILEARN_GM)
    gm = np.asanyarray(img.dataobj)[::step, ::step, ::step]
    affine = img.affine.copy()
    affine[:3, :3] *= step
    blocks = np.indices(gm.shape) * step // 12
    labels = 1 + blocks[0] + 40 * blocks[1] + 1600 * blocks[2]
    labels[gm < 0.2 * gm.max()] = 0
    return nib.Nifti1Image(labels.astype(np.int16), affine)


@pytest.fixture(scope="module")
def masters(tmp_path_factory) -> dict[int, Path]:
    """One real labels image per resolution (1 and 2 mm), each with its index/name table."""
    folder = tmp_path_factory.mktemp("masters")
    out = {}
    for step in (1, 2):
        img = _block_labels(step)
        path = folder / f"atlas-Demo{step}mm_dseg.nii.gz"
        nib.save(img, path)
        ids = np.unique(np.asanyarray(img.dataobj))
        rows = ["index\tname"] + [f"{i}\tblock{i}" for i in ids[ids > 0]]
        table_path_for(path).write_text("\n".join(rows) + "\n")
        out[step] = path
    return out


def place(master: Path, image: Path, column: str = "name", table: Path | None = None) -> Path:
    """Copy a master image (same bytes) and its table, optionally renaming the names column."""
    image.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(master, image)
    text = table_path_for(master).read_text().replace("index\tname", f"index\t{column}", 1)
    (table or table_path_for(image)).write_text(text)
    return image


def make_dataset(root: Path, masters, files: dict[str, int], deep: bool = False) -> Path:
    """A BIDS atlas dataset; ``files`` maps file name (in its tpl- folder) → master step."""
    write_json(root / "dataset_description.json", {
        "Name": "atlases", "BIDSVersion": "1.11.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "test"}]})
    write_json(root / "atlas-Demo_description.json", {"Name": "Demo", "Description": "blocks"})
    for name, step in files.items():
        folder = root / name.split("_")[0] / ("anat" if deep else "")
        place(masters[step], folder / name)
    return root


def make_templateflow(home: Path, masters, res_steps=((2, "02"),), template=SPACE) -> Path:
    """A TemplateFlow-like cache: entities in TemplateFlow's order, one table without res- whose
    names column is ``label``."""
    folder = home / f"tpl-{template}"
    for step, res in res_steps:
        name = f"tpl-{template}_res-{res}_atlas-Demo_desc-100Parcels_dseg.nii.gz"
        place(masters[step], folder / name, column="label",
              table=folder / f"tpl-{template}_atlas-Demo_desc-100Parcels_dseg.tsv")
    (folder / f"tpl-{template}_res-01_atlas-Other_dseg.nii.gz").write_bytes(b"")  # not fetched
    return home


def resolve(request: AtlasRequest, tmp_path: Path, out: str, zooms=(2.0, 2.0, 2.0), **kwargs):
    kwargs = {"space": SPACE, "datasets": {}, "templateflow_home": None, **kwargs}
    found = find_atlas(request, **kwargs)
    chosen = found.pick(zooms)
    rel = publish_atlas(found, chosen, tmp_path / out, SPACE)
    return found, chosen, rel, load_atlas(found.label, tmp_path / out / "atlases" / rel)


@pytest.mark.parametrize("value, expected", [
    ("Demo=/a/b_dseg.nii.gz", AtlasRequest("Demo", Path("/a/b_dseg.nii.gz"))),
    ("Demo=c:/x=y.nii", AtlasRequest("Demo", Path("c:/x=y.nii"))),
    ("Schaefer2018", AtlasRequest("Schaefer2018")),
    ("Schaefer2018:desc-400Parcels7Networks",
     AtlasRequest("Schaefer2018", None, "400Parcels7Networks")),
])
def test_parse_atlas_arg(value, expected):
    assert parse_atlas_arg(value) == expected


@pytest.mark.parametrize("value", ["", "=x.nii", "Demo=", "De-mo=x.nii", "/data/atlas.nii.gz",
                                   "Demo:res-2", "Demo:desc-", "Demo:desc-a_b", "Demo:"])
def test_parse_atlas_arg_rejects(value):
    with pytest.raises(ValueError) as err:
        parse_atlas_arg(value)
    assert "\n" not in str(err.value)


def test_three_sources_give_the_same_atlas(tmp_path, masters):
    ds = make_dataset(tmp_path / "atl", masters,
                      {f"tpl-{SPACE}_res-2_atlas-Demo_dseg.nii.gz": 2}, deep=True)
    home = make_templateflow(tmp_path / "tf", masters)
    plain = place(masters[2], tmp_path / "mine" / "atlas-Demo_dseg.nii.gz")

    f_file, _, rel_file, a_file = resolve(AtlasRequest("Demo", plain), tmp_path, "o1")
    f_ds, _, rel_ds, a_ds = resolve(AtlasRequest("Demo"), tmp_path, "o2",
                                    datasets={"fmriprep": tmp_path / "none", "atl": ds},
                                    templateflow_home=home)
    f_tf, _, rel_tf, a_tf = resolve(AtlasRequest("Demo"), tmp_path, "o3",
                                    datasets={"atl": tmp_path / "none"}, templateflow_home=home)
    assert (f_file.origin, f_ds.origin, f_tf.origin) == ("file", "atl", "templateflow")
    assert rel_file == f"tpl-{SPACE}/tpl-{SPACE}_atlas-Demo_dseg.nii.gz"  # BOLD space assumed
    assert rel_ds == f"tpl-{SPACE}/tpl-{SPACE}_res-2_atlas-Demo_dseg.nii.gz"
    assert rel_tf == f"tpl-{SPACE}/tpl-{SPACE}_res-02_desc-100Parcels_atlas-Demo_dseg.nii.gz"
    for atlas in (a_file, a_ds, a_tf):
        np.testing.assert_array_equal(atlas.labels, a_file.labels)
        np.testing.assert_allclose(atlas.affine, a_file.affine)
        assert atlas.table.equals(a_file.table)  # TemplateFlow's "label" column became "name"
        assert atlas.path.read_bytes() == masters[2].read_bytes()  # image bytes kept
    assert f_tf.files[0].table.name == f"tpl-{SPACE}_atlas-Demo_desc-100Parcels_dseg.tsv"
    described = json.loads((tmp_path / "o1/atlases/atlas-Demo_description.json").read_text())
    assert SPACE in described["Description"] and str(plain.resolve()) in described["Description"]
    copied = json.loads((tmp_path / "o2/atlases/atlas-Demo_description.json").read_text())
    assert copied == {"Name": "Demo", "Description": "blocks"}
    assert "TemplateFlow cache" in json.loads(
        (tmp_path / "o3/atlases/atlas-Demo_description.json").read_text())["Description"]


@pytest.mark.parametrize("zooms, expected", [
    ((2.0, 2.0, 2.0), "coarse"), ((2.0, 2.0, 2.0, 0.8), "coarse"), ((1.2, 1.2, 1.2), "fine"),
    ((1.5, 1.5, 1.5), "fine"), ((2.4, 2.4, 3.0), "coarse"), ((1.0, 1.0, 1.0), "fine"),
])
def test_resolution_from_header_zooms(tmp_path, masters, zooms, expected):
    # res labels say nothing about size: the header decides, ties go to the finer image
    ds = make_dataset(tmp_path / "atl", masters, {
        f"tpl-{SPACE}_res-fine_atlas-Demo_dseg.nii.gz": 1,
        f"tpl-{SPACE}_atlas-Demo_res-coarse_dseg.nii.gz": 2})
    found = find_atlas(AtlasRequest("Demo"), space=SPACE, datasets={"atl": ds},
                       templateflow_home=None)
    assert sorted(f.res for f in found.files) == ["coarse", "fine"]
    assert f"res-{expected}" in found.pick(zooms).name


def test_templateflow_resolutions(tmp_path, masters):
    home = make_templateflow(tmp_path / "tf", masters, res_steps=((1, "01"), (2, "02")))
    found = find_atlas(AtlasRequest("Demo"), space=SPACE, datasets={}, templateflow_home=home)
    assert found.pick((2, 2, 2)).name == f"{TF_STEM}.nii.gz"
    assert found.pick((1.2, 1.2, 1.2)).name == f"{TF_STEM.replace('res-02', 'res-01')}.nii.gz"
    assert {f.table for f in found.files} == {
        home / f"tpl-{SPACE}" / f"tpl-{SPACE}_atlas-Demo_desc-100Parcels_dseg.tsv"}


def test_space_mismatch(tmp_path, masters, caplog):
    ds = make_dataset(tmp_path / "atl", masters, {f"tpl-{OTHER}_atlas-Demo_dseg.nii.gz": 2})
    with pytest.raises(AtlasError) as err:
        find_atlas(AtlasRequest("Demo"), space=SPACE, datasets={"atl": ds},
                   templateflow_home=None)
    message = str(err.value)
    assert OTHER in message and SPACE in message and ALLOW_MISMATCH_FLAG in message

    with caplog.at_level(logging.WARNING, logger="bids_fmristore"):
        found = find_atlas(AtlasRequest("Demo"), space=SPACE, datasets={"atl": ds},
                           templateflow_home=None, allow_space_mismatch=True)
    assert found.template == OTHER
    assert any(r.levelno == logging.WARNING and OTHER in r.getMessage() for r in caplog.records)
    rel = publish_atlas(found, found.pick((2, 2, 2)), tmp_path / "out", SPACE)
    assert rel.startswith(f"tpl-{OTHER}/tpl-{OTHER}_")

    # the right template in a later source wins over a mismatched earlier one, silently
    caplog.clear()
    home = make_templateflow(tmp_path / "tf", masters)
    found = find_atlas(AtlasRequest("Demo"), space=SPACE, datasets={"atl": ds},
                       templateflow_home=home)
    assert (found.origin, found.template) == ("templateflow", SPACE)
    assert not caplog.records

    named = place(masters[2], tmp_path / f"tpl-{OTHER}_atlas-X_dseg.nii.gz")
    with pytest.raises(AtlasError, match=f"template {OTHER}.*space {SPACE}"):
        find_atlas(AtlasRequest("Demo", named), space=SPACE, datasets={}, templateflow_home=None)


def test_desc_variants(tmp_path, masters):
    ds = make_dataset(tmp_path / "atl", masters, {
        f"tpl-{SPACE}_atlas-Demo_desc-100Parcels_dseg.nii.gz": 2,
        f"tpl-{SPACE}_desc-400Parcels_atlas-Demo_dseg.nii.gz": 2,
        f"tpl-{OTHER}_atlas-Demo_desc-999Parcels_dseg.nii.gz": 2})
    kwargs = {"space": SPACE, "datasets": {"atl": ds}, "templateflow_home": None}
    with pytest.raises(AtlasError) as err:
        find_atlas(parse_atlas_arg("Demo"), **kwargs)
    assert "desc-100Parcels, desc-400Parcels" in str(err.value)
    assert "--atlas Demo:desc-" in str(err.value)
    found = find_atlas(parse_atlas_arg("Demo:desc-400Parcels"), **kwargs)
    assert found.desc == "400Parcels" and "desc-400Parcels" in found.files[0].image.name
    rel = publish_atlas(found, found.files[0].image, tmp_path / "out", SPACE)
    assert rel == f"tpl-{SPACE}/tpl-{SPACE}_desc-400Parcels_atlas-Demo_dseg.nii.gz"
    with pytest.raises(AtlasError, match="desc found: 100Parcels, 400Parcels, 999Parcels"):
        find_atlas(parse_atlas_arg("Demo:desc-7Parcels"), **kwargs)


def test_missing_atlas_names_places_searched(tmp_path, masters):
    ds = make_dataset(tmp_path / "atl", masters, {f"tpl-{SPACE}_atlas-Demo_dseg.nii.gz": 2})
    home = make_templateflow(tmp_path / "tf", masters)
    with pytest.raises(AtlasError) as err:
        find_atlas(AtlasRequest("Other"), space=SPACE, templateflow_home=home,
                   datasets={"atl": ds, "gone": tmp_path / "gone"})
    message = str(err.value)
    assert "atlas Other not found" in message  # the empty (unfetched) TemplateFlow file is skipped
    assert f"atlas dataset atl ({ds})" in message and f"TemplateFlow cache {home}" in message
    assert f"atlas dataset gone ({tmp_path / 'gone'}, missing)" in message
    with pytest.raises(AtlasError, match="does not exist"):
        find_atlas(AtlasRequest("Demo", tmp_path / "no.nii.gz"), space=SPACE, datasets={},
                   templateflow_home=None)


def test_published_atlases_indexed_by_pybids(tmp_path, masters):
    from bids import BIDSLayout

    home = make_templateflow(tmp_path / "tf", masters, res_steps=((1, "01"), (2, "02")))
    found = find_atlas(AtlasRequest("Demo"), space=SPACE, datasets={}, templateflow_home=home)
    out = tmp_path / "out"
    rel = publish_atlas(found, found.pick((2, 2, 2)), out, SPACE)
    description = json.loads((out / "atlases" / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    layout = BIDSLayout(out / "atlases", validate=False, config=["bids", "derivatives"])
    (dseg,) = layout.get(suffix="dseg", extension=".nii.gz")
    assert Path(dseg.path) == out / "atlases" / rel
    ents = layout.parse_file_entities(dseg.path)
    assert {k: ents[k] for k in ("atlas", "res", "desc", "suffix", "extension")} == {
        "atlas": "Demo", "res": "02", "desc": "100Parcels", "suffix": "dseg",
        "extension": ".nii.gz"}
    assert layout.get(atlas="Demo", suffix="dseg", extension=".tsv")


def test_concurrent_publish(tmp_path, masters):
    home = make_templateflow(tmp_path / "tf", masters)
    found = find_atlas(AtlasRequest("Demo"), space=SPACE, datasets={}, templateflow_home=home)
    chosen = found.files[0].image
    for attempt in range(4):
        out = tmp_path / f"out{attempt}"
        barrier, results, errors = threading.Barrier(3), [], []

        def job(out=out, barrier=barrier, results=results, errors=errors):
            barrier.wait()
            try:
                results.append(publish_atlas(found, chosen, out, SPACE))
            except Exception as err:  # pragma: no cover - reported by the assert below
                errors.append(err)

        threads = [threading.Thread(target=job) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors and len(set(results)) == 1
        files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
        assert not [p for p in files if PARTIAL_MARK in p.name]
        assert len(files) == 4  # image, table, dataset and atlas descriptions
        assert (out / "atlases" / results[0]).read_bytes() == chosen.read_bytes()
        load_atlas("Demo", out / "atlases" / results[0])


def test_publish_refuses_other_content(tmp_path, masters):
    one = place(masters[2], tmp_path / "a" / "atlas-Demo_dseg.nii.gz")
    two = place(masters[1], tmp_path / "b" / "atlas-Demo_dseg.nii.gz")
    out = tmp_path / "out"
    kwargs = {"space": SPACE, "datasets": {}, "templateflow_home": None}
    rel = publish_atlas(first := find_atlas(AtlasRequest("Demo", one), **kwargs), one, out, SPACE)
    assert publish_atlas(first, one, out, SPACE) == rel  # same bytes again: kept
    second = find_atlas(AtlasRequest("Demo", two), **kwargs)
    with pytest.raises(AtlasError, match="exists with other content"):
        publish_atlas(second, two, out, SPACE)
    assert (out / "atlases" / rel).read_bytes() == one.read_bytes()
    assert publish_atlas(second, two, out, SPACE, overwrite=True) == rel
    assert (out / "atlases" / rel).read_bytes() == two.read_bytes()


def test_publish_checks_before_copying(tmp_path, masters):
    bad = place(masters[2], tmp_path / "atlas-Demo_dseg.nii.gz")
    table_path_for(bad).write_text("index\tname\n1\tonly\n")  # most labels unnamed
    found = find_atlas(AtlasRequest("Demo", bad), space=SPACE, datasets={},
                       templateflow_home=None)
    with pytest.raises(AtlasError, match="not in"):
        publish_atlas(found, bad, tmp_path / "out", SPACE)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.nii.gz"))
    # a TemplateFlow table is validated through a staged copy; errors still name the real files
    home = make_templateflow(tmp_path / "tf", masters)
    table = home / f"tpl-{SPACE}" / f"tpl-{SPACE}_atlas-Demo_desc-100Parcels_dseg.tsv"
    table.write_text("index\tlabel\n1\tonly\n")
    found = find_atlas(AtlasRequest("Demo"), space=SPACE, datasets={}, templateflow_home=home)
    with pytest.raises(AtlasError) as err:
        publish_atlas(found, found.files[0].image, tmp_path / "out", SPACE)
    assert f"of {TF_STEM}.nii.gz are not in {table.name}" in str(err.value)


def _tf_layout(home: Path, masters, template=SPACE) -> Path:
    """A TemplateFlow-like cache holding Demo (res-02, table without res-) in ``template``."""
    return make_templateflow(home, masters, template=template)


@pytest.mark.parametrize("parent", ["anat", "perf", f"tpl-{OTHER}_res-9_desc-bad_atlas-Demo"])
def test_entities_come_from_file_names_only(tmp_path, masters, parent):
    # pybids issue 1270: its stock patterns also match folders above the dataset
    base = tmp_path / parent
    ds = make_dataset(base / "atl", masters, {
        f"tpl-{SPACE}_res-2_atlas-Demo_dseg.nii.gz": 2}, deep=True)
    home = _tf_layout(base / "templateflow", masters)
    plain = place(masters[2], base / "mine" / "atlas-Demo_dseg.nii.gz")
    from_ds = find_atlas(AtlasRequest("Demo"), space=SPACE, datasets={"atl": ds},
                         templateflow_home=None)
    assert (from_ds.template, from_ds.desc, [f.res for f in from_ds.files]) == (SPACE, None, ["2"])
    assert from_ds.files[0].table == table_path_for(from_ds.files[0].image)
    from_tf = find_atlas(AtlasRequest("Demo"), space=SPACE, datasets={}, templateflow_home=home)
    assert (from_tf.template, from_tf.desc, [f.res for f in from_tf.files]) == (
        SPACE, "100Parcels", ["02"])
    assert from_tf.files[0].table.name == f"tpl-{SPACE}_atlas-Demo_desc-100Parcels_dseg.tsv"
    from_file = find_atlas(AtlasRequest("Demo", plain), space=SPACE, datasets={},
                           templateflow_home=None)
    assert (from_file.template, from_file.desc, from_file.files[0].res) == (None, None, None)


def test_malformed_files_fail_only_the_atlas_that_needs_them(tmp_path, masters):
    ds = make_dataset(tmp_path / "atl", masters, {
        f"tpl-{SPACE}_atlas-Demo_dseg.nii.gz": 2, f"tpl-{SPACE}_atlas-Other_dseg.nii.gz": 2})
    folder = ds / f"tpl-{SPACE}"
    (ds / "dataset_description.json").write_bytes(b"")  # invalid JSON: pybids tolerates it
    (folder / f"tpl-{SPACE}_atlas-Demo_dseg.json").write_bytes(b"{")
    (folder / f"tpl-{SPACE}_atlas-Other_dseg.tsv").write_bytes(b"\xff\xfe\x00index")
    (ds / "atlas-Other_description.json").write_bytes(b"{not json")
    (ds / "README").write_text("atlases\n")
    (ds / "code").mkdir()
    (ds / "code" / "x_dseg.nii.gz").write_bytes(b"\x00")
    kwargs = {"space": SPACE, "datasets": {"atl": ds}, "templateflow_home": None}
    found, _, rel, atlas = resolve(AtlasRequest("Demo"), tmp_path, "out", **kwargs)
    assert found.origin == "atl" and atlas.table.shape[0] > 10
    with pytest.raises(AtlasError) as err:
        find_atlas(AtlasRequest("Other"), **kwargs)
    message = str(err.value)
    assert str(ds / "atlas-Other_description.json") in message and "\n" not in message
    (ds / "atlas-Other_description.json").write_text('["a list"]')
    with pytest.raises(AtlasError, match="is not a JSON object"):
        find_atlas(AtlasRequest("Other"), **kwargs)
    (ds / "atlas-Other_description.json").unlink()
    other = find_atlas(AtlasRequest("Other"), **kwargs)
    with pytest.raises(AtlasError) as err:
        publish_atlas(other, other.files[0].image, tmp_path / "out", SPACE)
    message = str(err.value)
    assert f"cannot read {folder / f'tpl-{SPACE}_atlas-Other_dseg.tsv'}" in message
    assert "\n" not in message
    assert (tmp_path / "out" / "atlases" / rel).is_file()  # Demo's copy untouched


@pytest.mark.parametrize("content, readable", [
    (["not", "an object"], False),
    ({"DatasetType": "derivative", "GeneratedBy": {"Name": "x"}}, False),
    ({"DatasetType": "derivative", "PipelineDescription": {"Name": "old"}}, True),
    ({"DatasetType": "derivative"}, True),
])
def test_dataset_description_pybids_cannot_read(tmp_path, masters, content, readable):
    ds = make_dataset(tmp_path / "atl", masters, {f"tpl-{SPACE}_atlas-Demo_dseg.nii.gz": 2})
    write_json(ds / "dataset_description.json", content)
    kwargs = {"space": SPACE, "datasets": {"atl": ds}, "templateflow_home": None}
    if readable:  # an old-style description: no warning escapes (pytest makes them errors)
        assert find_atlas(AtlasRequest("Demo"), **kwargs).origin == "atl"
    else:
        with pytest.raises(AtlasError) as err:
            find_atlas(AtlasRequest("Demo"), **kwargs)
        message = str(err.value)
        assert message.startswith(f"{ds / 'dataset_description.json'}: pybids cannot read")
        assert "\n" not in message
    # a dataset without the atlas asked for is not indexed at all
    with pytest.raises(AtlasError, match="atlas Absent not found"):
        find_atlas(AtlasRequest("Absent"), **kwargs)


def test_templateflow_cache_indexes_only_what_is_asked(tmp_path, masters, monkeypatch):
    from bids_fmristore.atlas import index as atlas_index
    from bids_fmristore.atlas.catalog import AtlasCatalog
    from bids_fmristore.atlas.sources import AtlasIndex

    home = _tf_layout(tmp_path / "tf", masters)
    place(masters[1], home / f"tpl-{SPACE}" / f"tpl-{SPACE}_res-01_atlas-Two_dseg.nii.gz")
    for template in (SPACE, OTHER, "Third"):
        folder = home / f"tpl-{template}"
        (folder / "cohort-1").mkdir(parents=True, exist_ok=True)
        for name in ("template_description.json", f"tpl-{template}_res-01_T1w.nii.gz",
                     f"tpl-{template}_res-01_label-GM_probseg.nii.gz",
                     f"tpl-{template}_res-01_atlas-Schaefer2018_desc-100Parcels_dseg.nii.gz",
                     f"tpl-{template}_atlas-Schaefer2018_desc-100Parcels_dseg.tsv",
                     f"tpl-{template}_res-01_atlas-Demo_probseg.nii.gz",
                     f"tpl-{template}_from-X_to-{template}_mode-image_xfm.h5",
                     f"cohort-1/tpl-{template}_cohort-1_res-01_T1w.nii.gz"):
            (folder / name).write_bytes(b"\x00")
    # not fetched: an empty file and a broken annex link
    (home / f"tpl-{OTHER}" / f"tpl-{OTHER}_res-02_atlas-Demo_dseg.nii.gz").write_bytes(b"")
    (home / f"tpl-{OTHER}" / f"tpl-{OTHER}_res-01_atlas-Demo_dseg.nii.gz").symlink_to(
        tmp_path / "annex" / "missing")

    index = AtlasIndex(["Demo"])
    images = index.images(home, "Demo", SPACE)
    demo = [home / f"tpl-{SPACE}" / f"{TF_STEM}.nii.gz",
            home / f"tpl-{SPACE}" / f"tpl-{SPACE}_atlas-Demo_desc-100Parcels_dseg.tsv"]
    assert [path for path, _ in images] == demo[:1]
    assert index.indexed(home) == sorted(demo)
    assert index.images(home, "Demo") == images  # no other template has Demo fetched
    assert index.indexed(home) == sorted(demo)

    built = []
    real = atlas_index.BIDSLayout
    monkeypatch.setattr(atlas_index, "BIDSLayout", lambda *a, **k: built.append(a) or real(*a, **k))
    catalog = AtlasCatalog([AtlasRequest("Demo"), AtlasRequest("Two")], space=SPACE, datasets={},
                           output_dir=tmp_path / "out", templateflow_home=home)
    assert [c.files[0].image.name for _, c in catalog._found] == [
        f"{TF_STEM}.nii.gz", f"tpl-{SPACE}_res-01_atlas-Two_dseg.nii.gz"]
    assert len(built) == 1  # one index of the cache for both atlases
    assert not (tmp_path / "out").exists()


def test_cohort_folders_root_tables_and_duplicates(tmp_path, masters):
    root = make_dataset(tmp_path / "atl", masters, {})
    deep = root / f"tpl-{SPACE}" / "cohort-1" / "anat"
    stem = f"tpl-{SPACE}_cohort-1_res-2_atlas-Demo_dseg"
    place(masters[2], deep / f"{stem}.nii.gz", table=root / "atlas-Demo_dseg.tsv")
    shutil.copyfile(masters[1], deep / f"{stem}.nii")  # same name uncompressed: not used
    place(masters[1], deep / "too" / f"tpl-{SPACE}_res-1_atlas-Demo_dseg.nii.gz")  # too deep
    found = find_atlas(AtlasRequest("Demo"), space=SPACE, datasets={"atl": root},
                       templateflow_home=None)
    assert found.files == (type(found.files[0])("2", deep / f"{stem}.nii.gz",
                                                 root / "atlas-Demo_dseg.tsv"),)
    assert found.template == SPACE
    rel = publish_atlas(found, found.files[0].image, tmp_path / "out", SPACE)
    assert rel == f"tpl-{SPACE}/tpl-{SPACE}_res-2_atlas-Demo_dseg.nii.gz"
