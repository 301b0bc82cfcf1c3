"""Untrusted BOLD files: headers checked against the file, damage and NaN/Inf found per run."""

from __future__ import annotations

import gzip
import logging
import warnings

import nibabel as nib
import numpy as np
import pytest

from bids_fmristore.compute.parcellate import Parcels, VoxelMoments, parcellate_run
from bids_fmristore.errors import InputError, RunError
from bids_fmristore.inputs.nifti_header import read_info
from bids_fmristore.inputs.nifti_stream import iter_volumes


def _save(path, data, **kw):
    img = nib.Nifti1Image(data, np.eye(4), **kw)
    nib.save(img, path)
    return path


def _with_header(path, header: nib.Nifti1Header, payload: bytes):
    raw = header.binaryblock + b"\0" * 4 + payload
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def _header(shape, dtype=np.int16) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_data_offset(352)
    return header


# -- read_info: the header against the file ----------------------------------------------------


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_header_promising_more_than_the_file_holds(tmp_path, ext):
    path = _with_header(tmp_path / f"lie{ext}", _header((2000, 2000, 2000, 50)), b"\0" * 800)
    with pytest.raises(RunError) as err:
        read_info(path, want_4d=True)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: header promises 2000x2000x2000x50 int16 (745 GB) but "
                              "the file holds "), message
    assert isinstance(err.value, InputError)


def test_nii_cut_inside_the_data(tmp_path, rng):
    path = _save(tmp_path / "cut.nii", rng.normal(size=(4, 4, 4, 6)).astype(np.float32))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(RunError, match=r"cut\.nii: header promises 4x4x4x6 float32 \(1\.84 kB\) "
                                       r"but the file holds 1\.83 kB"):
        read_info(path)


def test_gz_trailer_disagreeing_is_checked_by_decompression(tmp_path, rng):
    """A multi-member gzip (trailer of its last member only) is valid; a short stream is not."""
    data = rng.normal(size=(5, 4, 3, 7)).astype(np.float32)
    good = _save(tmp_path / "good.nii.gz", data)
    raw = gzip.decompress(good.read_bytes())
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    got = np.concatenate([b.copy() for _, b in iter_volumes(read_info(multi, want_4d=True), 3)])
    assert np.array_equal(got, data.reshape(-1, 7, order="F").T)
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(raw[:-1]))
    with pytest.raises(RunError, match="short.nii.gz: truncated or damaged: header promises"):
        read_info(short)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(good.read_bytes()[:-30])  # trailer and end of the stream lost
    with pytest.raises(RunError, match="cut.nii.gz: truncated or damaged"):
        read_info(cut)


def test_three_d_image_where_a_series_is_expected(tmp_path):
    path = _save(tmp_path / "vol.nii.gz", np.zeros((3, 4, 5), np.float32))
    with pytest.raises(RunError, match=r"vol\.nii\.gz is 3-D \(3x4x5\); expected a 4-D BOLD "
                                       "series"):
        read_info(path, want_4d=True)
    assert read_info(path).shape == (3, 4, 5, 1)  # cohort maps are 3-D
    one = _save(tmp_path / "one.nii.gz", np.zeros((3, 4, 5, 1), np.float32))
    assert read_info(one, want_4d=True).shape == (3, 4, 5, 1)


def test_dimensions(tmp_path):
    for name, dims, match in [("zero", (3, 0, 3, 4), "non-positive dimensions 3x0x3x4"),
                              ("neg", (3, -3, 3, 4), "non-positive dimensions 3x-3x3x4"),
                              ("five", (3, 3, 3, 4, 2), r"is 5-D \(3x3x3x4x2\)")]:
        header = _header((3, 3, 3, 4))
        header["dim"][: len(dims) + 1] = [len(dims), *dims]
        path = _with_header(tmp_path / f"{name}.nii", header, b"\0" * 2000)
        with pytest.raises(RunError, match=rf"{name}\.nii.*{match}"):
            read_info(path)
    # trailing dimensions of size 1 do not change the bytes: read as 4-D
    header = _header((3, 3, 3, 4, 1))
    path = _with_header(tmp_path / "five1.nii", header, np.arange(108, dtype="<i2").tobytes())
    info = read_info(path, want_4d=True)
    assert info.shape == (3, 3, 3, 4)
    assert np.array_equal(next(iter_volumes(info, 4))[1].ravel(), np.arange(108))


@pytest.mark.parametrize("dtype, name", [(np.complex64, "complex64"),
                                         (np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]),
                                          "RGB")])
def test_unsupported_data_types(tmp_path, dtype, name):
    path = _save(tmp_path / "c.nii.gz", np.zeros((2, 2, 2, 3), dtype))
    with pytest.raises(RunError, match=rf"c\.nii\.gz: data type {name} is not supported"):
        read_info(path)


@pytest.mark.parametrize("name, content, match", [
    ("empty.nii.gz", b"", "empty file"),
    ("text.nii.gz", b"not a nifti\n" * 20, r"not a gzip file \(named \.gz\), or truncated"),
    ("text.nii", b"not a nifti\n" * 50, "not a NIfTI image, or its header is truncated"),
    ("head.nii", None, "not a NIfTI image, or its header is truncated"),
    ("head.nii.gz", None, "not a NIfTI image, or its header is truncated"),
])
def test_not_a_nifti_or_truncated_header(tmp_path, name, content, match):
    path = tmp_path / name
    if content is None:  # the first 100 of the 348 header bytes
        block = _header((2, 2, 2, 2)).binaryblock[:100]
        content = gzip.compress(block) if name.endswith(".gz") else block
    path.write_bytes(content)
    with pytest.raises(RunError) as err:
        read_info(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
    assert err.match(match)


def test_missing_file(tmp_path):
    with pytest.raises(RunError, match="nope.nii.gz: no such file"):
        read_info(tmp_path / "nope.nii.gz")


# -- damage found while streaming --------------------------------------------------------------


@pytest.mark.parametrize("read_ahead", [True, False])
def test_gz_damaged_in_the_middle(tmp_path, rng, read_ahead):
    """Same length and trailer (read_info cannot tell); the stream fails its checks."""
    path = _save(tmp_path / "d.nii.gz", rng.normal(size=(8, 8, 8, 12)).astype(np.float32))
    info = read_info(path)
    content = bytearray(path.read_bytes())
    middle = len(content) // 2
    content[middle : middle + 64] = bytes(255 - b for b in content[middle : middle + 64])
    path.write_bytes(bytes(content))
    assert read_info(path).shape == info.shape
    with pytest.raises(RunError, match=r"d\.nii\.gz: truncated or damaged: ") as err:
        for _ in iter_volumes(info, 2, read_ahead=read_ahead):
            pass
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_file_shortened_after_its_header_was_read(tmp_path, rng, ext):
    path = _save(tmp_path / f"s{ext}", rng.normal(size=(4, 4, 4, 10)).astype(np.float32))
    info = read_info(path)
    raw = path.read_bytes()
    path.write_bytes(gzip.compress(gzip.decompress(raw)[:-1000]) if ext == ".nii.gz"
                     else raw[:-1000])
    with pytest.raises(RunError, match=rf"s{ext}: truncated or damaged"):
        for _ in iter_volumes(info, 3):
            pass


# -- NaN and Inf -------------------------------------------------------------------------------


def _labels(rng, shape, n=4):
    labels = rng.integers(0, n + 1, size=shape)
    labels[0, 0, 0], labels[1, 0, 0] = 1, 2
    flat = np.flatnonzero((labels > 0).ravel(order="F"))
    return labels, flat, labels.ravel(order="F")[flat]


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("voxel_output", [True, False])
def test_partly_nonfinite_means_follow_nilearn(tmp_path, rng, caplog, voxel_output, scaled):
    """nilearn's NiftiLabelsMasker replaces NaN/Inf by 0 (with a warning); so do the means,
    whether the parcels' values are gathered for a voxel output or summed where the voxel
    maps' values lie (no voxel output), and in a float run with a scaling 0 is the scaled
    value (nilearn zeroes the scaled image), not the stored one."""
    from nilearn.maskers import NiftiLabelsMasker

    shape, n_t = (5, 4, 3), 9
    data = rng.normal(100, 5, size=(*shape, n_t)).astype(np.float32)
    data[0, 0, 0, 3] = np.nan   # label 1, one volume
    data[1, 0, 0, :] = np.inf   # label 2, every volume
    data[2, 1, 0, 5] = -np.inf
    labels, flat, lab = _labels(rng, shape)
    labels[2, 1, 0] = 3
    flat = np.flatnonzero((labels > 0).ravel(order="F"))
    lab = labels.ravel(order="F")[flat]
    path = tmp_path / "nan.nii.gz"
    img = nib.Nifti1Image(data, np.eye(4))
    if scaled:
        img.header.set_slope_inter(2.0, 30.0)
    nib.save(img, path)
    blocks = []
    sinks = [lambda t0, b: blocks.append(b.copy())] if voxel_output else None
    moments = None if voxel_output else VoxelMoments(np.arange(int(np.prod(shape))))
    with caplog.at_level(logging.WARNING, logger="bids_fmristore"):
        means = parcellate_run(read_info(path), [Parcels(flat, lab)], sinks, moments=moments,
                               per_chunk=4)
    assert means.nonfinite_voxels == 3
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [f"{path}: 3 voxel(s) inside the mask hold NaN or Inf in at least one "
                      "volume; they count as 0 in the parcel means (as in nilearn)"]
    labels_img = nib.Nifti1Image(labels.astype(np.int16), np.eye(4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = NiftiLabelsMasker(labels_img, standardize=None).fit_transform(str(path))
    assert any("Non-finite" in str(w.message) for w in caught)
    np.testing.assert_allclose(means[0], expected, rtol=1e-5)
    assert np.isfinite(means[0]).all()
    if voxel_output:  # the voxel data themselves are kept as they are
        voxels = np.concatenate(blocks)
        assert np.isnan(voxels).sum() == 1 and np.isinf(voxels).sum() == n_t + 1


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_means_are_the_same_sums_with_or_without_voxel_output(tmp_path, rng, dtype):
    """The parcels' sums taken where the voxel maps' values lie (bincount) equal, to the
    bit, those of the values gathered in label order for a voxel output (reduceat)."""
    shape, n_t = (9, 8, 7), 13
    data = rng.normal(1000, 50, size=(*shape, n_t)).astype(dtype)
    path = _save(tmp_path / "r.nii.gz", data)
    labels, flat, lab = _labels(rng, shape, 6)
    info = read_info(path)
    followed = np.arange(int(np.prod(shape)))
    (gathered,) = parcellate_run(info, [Parcels(flat, lab)], [lambda t0, b: None],
                                 moments=VoxelMoments(followed), per_chunk=3)
    (summed,) = parcellate_run(info, [Parcels(flat, lab)], moments=VoxelMoments(followed),
                               per_chunk=3)
    np.testing.assert_array_equal(summed, gathered)
    expected = [data.reshape(-1, n_t, order="F")[flat[lab == k]].astype(np.float64).mean(axis=0)
                for k in np.unique(lab)]
    np.testing.assert_allclose(summed, np.stack(expected, axis=1), rtol=1e-12)


def test_nonfinite_count_covers_moments_voxels(tmp_path, rng, caplog):
    """A voxel outside every parcel but in the maps' voxels counts once; its maps are NaN."""
    shape, n_t = (4, 4, 2), 5
    data = rng.normal(50, 2, size=(*shape, n_t)).astype(np.float32)
    data[3, 3, 1, 2] = np.nan  # flat index 31
    data[0, 0, 0, 0] = np.nan  # flat index 0, also in a parcel
    path = _save(tmp_path / "m.nii", data)
    parcels = Parcels(np.array([0, 1, 2]), np.array([1, 1, 2]))
    moments = VoxelMoments(np.arange(32))
    with caplog.at_level(logging.WARNING, logger="bids_fmristore"):
        means = parcellate_run(read_info(path), [parcels], moments=moments)
    assert means.nonfinite_voxels == 2
    stats = moments.result()
    assert np.flatnonzero(np.isnan(stats["mean"])).tolist() == [0, 31]
    assert "m.nii: 2 voxel(s)" in caplog.text


@pytest.mark.parametrize("fill", [np.nan, np.inf])
def test_all_nonfinite_run_is_a_run_error(tmp_path, rng, fill):
    shape = (4, 3, 2)
    data = np.full((*shape, 6), fill, np.float32)
    data[0, 0, 0] = 1.0  # outside the mask: does not count
    path = _save(tmp_path / "allnan.nii.gz", data)
    _, flat, lab = _labels(rng, shape)
    flat, lab = flat[flat != 0], lab[flat != 0]
    with pytest.raises(RunError, match=r"allnan\.nii\.gz: every value inside the mask is NaN "
                                       "or Inf"):
        parcellate_run(read_info(path), [Parcels(flat, lab)], per_chunk=4)
    with pytest.raises(RunError, match="every value inside the mask"):  # maps only
        parcellate_run(read_info(path), [], moments=VoxelMoments(flat))


def test_finite_and_integer_runs_report_no_nonfinite_voxel(tmp_path, rng, caplog):
    shape = (4, 3, 2)
    _, flat, lab = _labels(rng, shape)
    for dtype in (np.float32, np.int16):
        path = _save(tmp_path / f"ok-{np.dtype(dtype).name}.nii.gz",
                     rng.integers(0, 100, size=(*shape, 5)).astype(dtype))
        with caplog.at_level(logging.WARNING, logger="bids_fmristore"):
            means = parcellate_run(read_info(path), [Parcels(flat, lab)])
        assert means.nonfinite_voxels == 0
        assert len(means) == 1 and means[0].shape == (5, np.unique(lab).size)
    assert caplog.records == []
