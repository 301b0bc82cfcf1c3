"""LabeledVolumeSet: write → read round trips, the on-disk layout in raw h5py, refusals.

Grids are non-cubic and data asymmetric, so a swapped axis or a wrong voxel order cannot pass.
"""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
from conftest import OBLIQUE_AFFINE
from nibabel.quaternions import fillpositive, quat2mat

from bids_fmristore.errors import FormatError
from bids_fmristore.formats.labeled import LabeledVolumeSet, sanitize_label, write_labeled

SHAPE = (7, 5, 4)
LABELS = ["faces", "houses", "words"]


def make_mask() -> np.ndarray:
    x, y, z = np.indices(SHAPE)
    mask = (x + 2 * y + 3 * z) % 4 != 0
    mask[6, 4, 3] = True  # last voxel of the grid
    return mask


def make_volumes(n: int) -> list[np.ndarray]:
    x, y, z = np.indices(SHAPE)
    return [(x + 10 * y + 100 * z + 1000 * (i + 1)).astype(np.float32) for i in range(n)]


def fortran_voxels(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mask voxels of ``volume`` with x fastest, then y, then z (R's ``which``), by hand."""
    return np.array(
        [
            volume[i, j, k]
            for k in range(mask.shape[2])
            for j in range(mask.shape[1])
            for i in range(mask.shape[0])
            if mask[i, j, k]
        ]
    )


@pytest.fixture
def written(tmp_path):
    mask, vols = make_mask(), make_volumes(len(LABELS))
    path = write_labeled(
        tmp_path / "set.h5", mask=mask, affine=OBLIQUE_AFFINE, labels=LABELS, volumes=iter(vols)
    )
    return path, mask, vols


def test_round_trip_full_volumes(written):
    path, mask, vols = written
    with LabeledVolumeSet(path) as lv:
        assert lv.labels == LABELS and list(lv) == LABELS and len(lv) == 3
        assert lv.shape == SHAPE and lv.n_voxels == int(mask.sum())
        assert np.array_equal(lv.mask, mask)
        np.testing.assert_allclose(lv.affine, OBLIQUE_AFFINE, atol=1e-6)
        for label, vol in zip(LABELS, vols, strict=True):
            values = lv.values(label)
            assert values.dtype == np.float32
            assert np.array_equal(values, fortran_voxels(vol, mask))
            out = lv.volume(label)
            assert out.shape == SHAPE
            assert np.array_equal(out[mask], vol[mask]) and np.isnan(out[~mask]).all()
            zero = lv.volume(label, fill=0.0)
            assert np.array_equal(zero, np.where(mask, vol, 0))


def test_round_trip_mask_order_vectors_float64(tmp_path):
    mask = make_mask()
    vectors = [fortran_voxels(v, mask).astype(np.float64) / 7 for v in make_volumes(2)]
    path = write_labeled(
        tmp_path / "v.h5",
        mask=mask,
        affine=OBLIQUE_AFFINE,
        labels=["a", "b"],
        volumes=(v for v in vectors),
        dtype=np.float64,
    )
    with LabeledVolumeSet(path) as lv:
        for label, vec in zip(["a", "b"], vectors, strict=True):
            got = lv.values(label)
            assert got.dtype == np.float64 and np.array_equal(got, vec)


def test_on_disk_layout(written):
    path, mask, vols = written
    n = int(mask.sum())
    with h5py.File(path, "r") as f:
        assert f.attrs["fmristore_class"] == "LabeledVolumeSet"
        hdr = f["header"]
        assert hdr["dim"].dtype == np.int32
        assert hdr["dim"][()].tolist() == [4, 7, 5, 4, 3, 1, 1, 1]
        # qform rebuilt with nibabel's quaternion code, independent of ours
        b, c, d = (float(hdr[k][()]) for k in ("quatern_b", "quatern_c", "quatern_d"))
        zooms = hdr["pixdim"][1:4] * np.array([1, 1, float(hdr["qfac"][()])])
        affine = np.eye(4)
        affine[:3, :3] = quat2mat(fillpositive([b, c, d])) * zooms
        affine[:3, 3] = [float(hdr[k][()]) for k in ("qoffset_x", "qoffset_y", "qoffset_z")]
        np.testing.assert_allclose(affine, OBLIQUE_AFFINE, atol=1e-6)
        disk_mask = f["mask"]
        assert disk_mask.shape == (4, 5, 7) and disk_mask.dtype == np.uint8
        assert disk_mask.chunks is None
        assert np.array_equal(disk_mask[()], mask.T.astype(np.uint8))
        assert [s.decode() for s in f["labels"][()]] == LABELS
        assert h5py.check_string_dtype(f["labels"].dtype) is not None
        assert sorted(f["data"]) == LABELS
        for label, vol in zip(LABELS, vols, strict=True):
            ds = f["data"][label]
            assert ds.shape == (n,) and ds.chunks == (min(65536, n),)
            assert ds.compression == "gzip" and ds.compression_opts == 4 and ds.shuffle
            assert np.array_equal(ds[()], fortran_voxels(vol, mask))
            # C order over the on-disk (Z, Y, X) mask is the same sequence
            assert np.array_equal(ds[()], vol.T[mask.T])


def test_sanitize_label():
    assert sanitize_label("faces") == "faces"
    assert sanitize_label("a-b_c.d") == "a-b_c.d"
    assert sanitize_label("face s/x") == "face_s_x"
    assert sanitize_label("café") == "caf_"
    assert sanitize_label("日本") == "__"


def test_non_ascii_labels_round_trip(tmp_path):
    mask, vols = make_mask(), make_volumes(3)
    labels = ["café", "a b/c", "plain"]
    path = write_labeled(
        tmp_path / "u.h5", mask=mask, affine=OBLIQUE_AFFINE, labels=labels, volumes=vols
    )
    with h5py.File(path, "r") as f:
        assert [s.decode("utf-8") for s in f["labels"][()]] == labels
        assert sorted(f["data"]) == ["a_b_c", "caf_", "plain"]
    with LabeledVolumeSet(path) as lv:
        assert lv.labels == labels
        assert np.array_equal(lv.values("café"), fortran_voxels(vols[0], mask))
        assert np.array_equal(lv.values("a b/c"), fortran_voxels(vols[1], mask))


@pytest.mark.parametrize(
    "labels, match",
    [
        (["a b", "a_b"], "'a b' and 'a_b'"),
        (["é", "_"], "'é' and '_'"),
        (["same", "same"], "'same' and 'same'"),
        (["ok", ""], "non-empty"),
        (["ok", "."], "not a valid"),
        ([], "at least one"),
    ],
)
def test_bad_labels_refused(tmp_path, labels, match):
    with pytest.raises(ValueError, match=match):
        write_labeled(
            tmp_path / "x.h5",
            mask=make_mask(),
            affine=OBLIQUE_AFFINE,
            labels=labels,
            volumes=make_volumes(len(labels)),
        )
    assert list(tmp_path.iterdir()) == []


def test_failing_volume_iterator_leaves_nothing(tmp_path):
    vols = make_volumes(3)

    def volumes():
        yield vols[0]
        yield vols[1]
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_labeled(
            tmp_path / "x.h5",
            mask=make_mask(),
            affine=OBLIQUE_AFFINE,
            labels=LABELS,
            volumes=volumes(),
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("n_volumes, match", [(2, "got 2 volumes for 3"), (4, "more volumes")])
def test_volume_count_must_match(tmp_path, n_volumes, match):
    with pytest.raises(ValueError, match=match):
        write_labeled(
            tmp_path / "x.h5",
            mask=make_mask(),
            affine=OBLIQUE_AFFINE,
            labels=LABELS,
            volumes=make_volumes(n_volumes),
        )
    assert list(tmp_path.iterdir()) == []


def test_bad_volume_shape_and_mask_refused(tmp_path):
    mask = make_mask()
    with pytest.raises(ValueError, match="has shape"):
        write_labeled(
            tmp_path / "x.h5",
            mask=mask,
            affine=OBLIQUE_AFFINE,
            labels=["a"],
            volumes=[np.zeros(SHAPE[::-1])],
        )
    with pytest.raises(ValueError, match="no voxels"):
        write_labeled(
            tmp_path / "x.h5",
            mask=np.zeros(SHAPE, bool),
            affine=OBLIQUE_AFFINE,
            labels=["a"],
            volumes=[np.zeros(SHAPE)],
        )
    with pytest.raises(ValueError, match="X = 1 or Y = 1"):
        write_labeled(
            tmp_path / "x.h5",
            mask=np.ones((1, 5, 4), bool),
            affine=OBLIQUE_AFFINE,
            labels=["a"],
            volumes=[np.zeros((1, 5, 4))],
        )
    with pytest.raises(ValueError, match="4x4"):
        write_labeled(
            tmp_path / "x.h5",
            mask=mask,
            affine=np.eye(3),
            labels=["a"],
            volumes=[np.zeros(SHAPE)],
        )
    with pytest.raises(ValueError, match="dtype"):
        write_labeled(
            tmp_path / "x.h5",
            mask=mask,
            affine=OBLIQUE_AFFINE,
            labels=["a"],
            volumes=[np.zeros(SHAPE)],
            dtype=np.float16,
        )
    assert list(tmp_path.iterdir()) == []


def test_overwrite(written):
    path, mask, vols = written
    kwargs = dict(mask=mask, affine=OBLIQUE_AFFINE, labels=["only"], volumes=vols[:1])
    with pytest.raises(FileExistsError):
        write_labeled(path, **kwargs)
    write_labeled(path, overwrite=True, attrs={"writer": "test"}, **kwargs)
    with LabeledVolumeSet(path) as lv:
        assert lv.labels == ["only"]
    with h5py.File(path, "r") as f:
        assert f.attrs["writer"] == "test"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def _edited(path, tmp_path, edit) -> str:
    copy = tmp_path / "edited.h5"
    shutil.copy(path, copy)
    with h5py.File(copy, "r+") as f:
        edit(f)
    return copy


def test_reader_checks_dim4_and_mask_grid(written, tmp_path):
    path, _, _ = written

    def wrong_count(f):
        f["header/dim"][4] = 2

    with pytest.raises(FormatError, match=r"3 labels but /header/dim\[4\] = 2"):
        LabeledVolumeSet(_edited(path, tmp_path, wrong_count))

    def wrong_grid(f):
        del f["mask"]
        f["mask"] = np.ones((4, 7, 5), np.uint8)  # X and Y swapped

    with pytest.raises(FormatError, match="/mask grid"):
        LabeledVolumeSet(_edited(path, tmp_path, wrong_grid))


def test_reader_pads_short_data_and_refuses_long(written, tmp_path):
    path, mask, vols = written
    n = int(mask.sum())

    def resize(f):
        full = f["data/faces"][()]
        del f["data/faces"], f["data/houses"]
        f["data/faces"] = full[: n - 3]
        f["data/houses"] = np.concatenate([full, [1.0]])

    with LabeledVolumeSet(_edited(path, tmp_path, resize)) as lv:
        with pytest.warns(UserWarning, match="padding with zeros"):
            values = lv.values("faces")
        expected = fortran_voxels(vols[0], mask)
        assert np.array_equal(values[: n - 3], expected[: n - 3])
        assert np.array_equal(values[n - 3 :], np.zeros(3))
        with pytest.raises(FormatError, match="expected"):
            lv.values("houses")
        with pytest.raises(KeyError, match="no label"):
            lv.values("nope")


def test_reader_without_qform_uses_zero_translation(written, tmp_path):
    path, _, _ = written

    def drop(f):
        del f["header/quatern_b"]

    with pytest.warns(UserWarning, match="qform"):
        lv = LabeledVolumeSet(_edited(path, tmp_path, drop))
    with lv:
        zooms = np.sqrt((OBLIQUE_AFFINE[:3, :3] ** 2).sum(axis=0))
        np.testing.assert_allclose(lv.affine, np.diag([*zooms, 1.0]), atol=1e-12)


def test_metadata_cache_stays_small_however_many_volumes(tmp_path):
    """A group file holds a volume per subject, and HDF5's metadata cache keeps the headers of
    the datasets visited: plain h5py lets it fill 2 MB by HDF5's own count, which in RSS made
    reading every volume of a 1,000-subject group file take 27 MB. The writer and the reader
    (the group report reads every volume) cap it at 1 MB: 8 MB of RSS for that file."""
    n, mask = 1500, make_mask()
    volumes = (np.full(SHAPE, float(i)) for i in range(n))
    path = write_labeled(tmp_path / "many.h5", mask=mask, affine=np.eye(4),
                         labels=[f"sub-{i:04d}" for i in range(n)], volumes=volumes)
    with LabeledVolumeSet(path) as maps:
        for i, label in enumerate(maps.labels):
            assert maps.values(label)[0] == i
        cached = maps._f.id.get_mdc_size()[2]
    with h5py.File(path, "r") as f:
        for name in f["data"]:
            f["data"][name][0]
        plain = f.id.get_mdc_size()[2]
    assert cached <= 1 << 20 < 3 * (1 << 19) < plain, (cached, plain)
