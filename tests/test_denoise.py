"""Cleaning parcel means equals nilearn's NiftiLabelsMasker on real fMRIPrep confounds."""

from __future__ import annotations

import numpy as np
import pytest
from confounds_data import N_REAL, TR, long_table, make_run, raw_means
from nilearn.maskers import NiftiLabelsMasker
from nilearn.signal import clean

from bids_fmristore.compute.denoise import (
    MIN_KEPT_VOLUMES,
    CleanOptions,
    clean_signals,
    clean_voxels,
)
from bids_fmristore.inputs.confounds import ConfoundsSpec, load_run_confounds


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """111 volumes: nilearn's table and three perturbed repeats (non-steady volumes 0-2)."""
    folder = tmp_path_factory.mktemp("long")
    return make_run(folder, long_table(3))


@pytest.fixture(scope="module")
def aroma_run(tmp_path_factory):
    """nilearn's real 30-row table beside an ICA-AROMA BOLD."""
    return make_run(tmp_path_factory.mktemp("aroma"), desc="smoothAROMAnonaggr")


def _masker(bold, labels, mask, opts: CleanOptions, confounds, sample_mask):
    masker = NiftiLabelsMasker(labels, mask_img=mask, standardize=opts.standardize,
                               detrend=opts.detrend, low_pass=opts.low_pass,
                               high_pass=opts.high_pass, t_r=opts.t_r, resampling_target="data")
    return masker.fit_transform(bold, confounds=confounds, sample_mask=sample_mask)


def _assert_same(ours, ref):
    assert ours.shape == ref.shape
    scale = max(np.abs(ref).max(), 1e-12)
    assert np.abs(ours - ref).max() <= 1e-5 * scale


OPTIONS = [
    CleanOptions(t_r=TR),
    CleanOptions(t_r=TR, detrend=True, standardize="zscore_sample"),
    CleanOptions(t_r=TR, standardize="psc", high_pass=0.01),
    CleanOptions(t_r=TR, detrend=True, low_pass=0.1, high_pass=0.01),
    CleanOptions(t_r=TR, standardize="zscore_sample", low_pass=0.08),
]
SPECS = [
    ConfoundsSpec("simple"),
    ConfoundsSpec("scrubbing", fd_threshold=4.0, std_dvars_threshold=3.5),
    ConfoundsSpec("compcor"),
    ConfoundsSpec("simple", columns=("framewise_displacement", "global_signal")),
    ConfoundsSpec(None, columns=("trans_x", "trans_y", "rot_z", "csf")),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label() + "+".join(s.columns))
@pytest.mark.parametrize("opts", OPTIONS, ids=range(len(OPTIONS)))
def test_equals_nilearn_masker(long_run, spec, opts):
    bold, labels, mask = long_run
    conf = load_run_confounds(bold, spec, 111)
    ours = clean_signals(raw_means(bold, labels, mask), conf.table, conf.sample_mask, opts)
    ref = _masker(bold, labels, mask, opts, conf.table, conf.sample_mask)
    _assert_same(ours, ref)
    n_kept = 111 if conf.sample_mask is None else len(conf.sample_mask)
    assert ours.shape == (n_kept, 4)
    # the regressors matter: the comparison would not notice them dropped otherwise
    unregressed = clean_signals(raw_means(bold, labels, mask), None, conf.sample_mask, opts)
    assert np.abs(ours - unregressed).max() > 1e-3 * np.abs(unregressed).max()


@pytest.mark.parametrize("opts", OPTIONS[:3], ids=range(3))
def test_ica_aroma_on_real_table(aroma_run, opts):
    bold, labels, mask = aroma_run
    conf = load_run_confounds(bold, ConfoundsSpec("ica_aroma"), N_REAL)
    assert conf.columns == ("cosine00", "csf", "white_matter")
    np.testing.assert_array_equal(conf.sample_mask, np.arange(3, N_REAL))
    ours = clean_signals(raw_means(bold, labels, mask), conf.table, conf.sample_mask, opts)
    _assert_same(ours, _masker(bold, labels, mask, opts, conf.table, conf.sample_mask))
    assert ours.shape == (N_REAL - 3, 4)


def test_raw_means_are_the_maskers(long_run):
    bold, labels, mask = long_run
    _assert_same(raw_means(bold, labels, mask),
                 _masker(bold, labels, mask, CleanOptions(t_r=TR), None, None))


def test_censoring_keeps_the_right_volumes(long_run):
    bold, labels, mask = long_run
    conf = load_run_confounds(bold, ConfoundsSpec("scrubbing", fd_threshold=4.0,
                                                  std_dvars_threshold=3.5), 111)
    kept = conf.sample_mask
    assert kept.dtype.kind == "i" and np.all(np.diff(kept) > 0)
    assert 0 not in kept and 1 not in kept and 2 not in kept  # non-steady volumes
    assert 30 < len(kept) < 108  # some high-motion volumes of the real rows are censored
    signals = raw_means(bold, labels, mask)
    out = clean_signals(signals, conf.table, kept, CleanOptions(t_r=TR))
    assert out.shape == (len(kept), signals.shape[1])


def test_every_volume_censored_is_a_clear_error(aroma_run):
    bold, labels, mask = aroma_run
    # nilearn's default 0.2 mm threshold censors every volume of its test table.
    conf = load_run_confounds(bold.with_name(bold.name.replace("smoothAROMAnonaggr", "preproc")),
                              ConfoundsSpec("scrubbing"), N_REAL)
    assert conf.sample_mask is not None and len(conf.sample_mask) == 0
    with pytest.raises(ValueError, match=r"^0 of 30 volumes kept after censoring"):
        clean_signals(raw_means(bold, labels, mask), conf.table, conf.sample_mask,
                      CleanOptions(t_r=TR))


def test_no_volume_censored(tmp_path):
    bold, labels, mask = make_run(tmp_path, long_table(2, nonsteady=False))
    conf = load_run_confounds(bold, ConfoundsSpec("scrubbing", fd_threshold=100.0,
                                                  std_dvars_threshold=100.0), 84)
    assert conf.sample_mask is None
    opts = CleanOptions(t_r=TR, detrend=True)
    ours = clean_signals(raw_means(bold, labels, mask), conf.table, None, opts)
    assert ours.shape == (84, 4)
    _assert_same(ours, _masker(bold, labels, mask, opts, conf.table, None))


def test_fewer_volumes_than_regressors(aroma_run):
    bold, labels, mask = aroma_run
    conf = load_run_confounds(bold.with_name(bold.name.replace("smoothAROMAnonaggr", "preproc")),
                              ConfoundsSpec("compcor"), N_REAL)
    assert conf.table.shape[1] >= 27 == len(conf.sample_mask)
    with pytest.raises(ValueError, match=r"^27 of 30 volumes kept .*\(30 regressors, minimum"):
        clean_signals(raw_means(bold, labels, mask), conf.table, conf.sample_mask,
                      CleanOptions(t_r=TR))


def test_minimum_kept_volumes():
    rng = np.random.default_rng(1)
    signals = rng.normal(size=(40, 3))
    ok = clean_signals(signals, None, np.arange(MIN_KEPT_VOLUMES), CleanOptions(t_r=TR))
    assert ok.shape == (MIN_KEPT_VOLUMES, 3)
    with pytest.raises(ValueError, match=f"at least {MIN_KEPT_VOLUMES} needed"):
        clean_signals(signals, None, np.arange(MIN_KEPT_VOLUMES - 1), CleanOptions(t_r=TR))


def test_nan_columns_stay_nan_and_do_not_touch_the_others():
    rng = np.random.default_rng(2)
    signals = 100 + rng.normal(size=(50, 4))
    confounds = rng.normal(size=(50, 3))
    kept = np.setdiff1d(np.arange(50), [5, 6, 30])
    opts = CleanOptions(t_r=TR, detrend=True, standardize="zscore_sample", high_pass=0.01)
    with_nan = signals.copy()
    with_nan[:, 1] = np.nan
    out = clean_signals(with_nan, confounds, kept, opts)
    assert np.isnan(out[:, 1]).all()
    ref = clean(signals[:, [0, 2, 3]], detrend=True, standardize="zscore_sample",
                confounds=confounds, sample_mask=kept, t_r=TR, high_pass=0.01)
    np.testing.assert_allclose(out[:, [0, 2, 3]], ref, rtol=1e-10, atol=1e-10)
    assert np.isfinite(out[:, [0, 2, 3]]).all()


def test_bool_sample_mask_and_bad_shapes():
    rng = np.random.default_rng(3)
    signals = rng.normal(size=(30, 2))
    keep = np.ones(30, bool)
    keep[[0, 4]] = False
    opts = CleanOptions(t_r=TR, detrend=True)
    by_bool = clean_signals(signals, None, keep, opts)
    by_index = clean_signals(signals, None, np.flatnonzero(keep), opts)
    np.testing.assert_array_equal(by_bool, by_index)
    with pytest.raises(ValueError, match="confounds have 29 rows, signals 30"):
        clean_signals(signals, np.zeros((29, 1)), None, CleanOptions(t_r=TR))
    with pytest.raises(ValueError, match="standardize must be one of"):
        clean_signals(signals, None, None, CleanOptions(t_r=TR, standardize="zscore"))


def test_voxel_series_equal_nifti_masker_and_chunks_do_not_matter(long_run):
    from nilearn.maskers import NiftiMasker

    bold, _, mask = long_run
    conf = load_run_confounds(bold, ConfoundsSpec("scrubbing", fd_threshold=4.0,
                                                  std_dvars_threshold=3.5), 111)
    opts = CleanOptions(t_r=TR, detrend=True, standardize="zscore_sample", high_pass=0.01)
    masker = NiftiMasker(mask, standardize=opts.standardize, detrend=opts.detrend,
                         high_pass=opts.high_pass, t_r=opts.t_r)
    ref = masker.fit_transform(bold, confounds=conf.table, sample_mask=conf.sample_mask)
    voxels = NiftiMasker(mask, standardize=None).fit_transform(bold).astype(np.float64)  # raw
    whole = clean_voxels(voxels, conf.table, conf.sample_mask, opts)
    _assert_same(whole, ref)
    # cleaning is per column: a second pass over voxel chunks gives the same numbers (up to
    # the rounding of blocked matrix products)
    chunks = [clean_voxels(voxels[:, i:i + 37], conf.table, conf.sample_mask, opts)
              for i in range(0, voxels.shape[1], 37)]
    np.testing.assert_allclose(np.hstack(chunks), whole, rtol=1e-10, atol=1e-12)


def test_filter_warnings_reach_the_caller():
    signals = np.random.default_rng(4).normal(size=(40, 2))
    with pytest.warns(UserWarning, match="Nyquist"):
        clean_signals(signals, None, None, CleanOptions(t_r=TR, low_pass=0.4))


@pytest.mark.parametrize("spec", SPECS[:3], ids=lambda s: s.label())
@pytest.mark.parametrize("opts", OPTIONS, ids=range(len(OPTIONS)))
def test_voxels_equal_nilearn_clean(long_run, spec, opts):
    """The linear-time voxel cleaning gives signal.clean's numbers (real confounds, censoring
    with interpolation before filtering, every standardization)."""
    from nilearn.maskers import NiftiMasker

    bold, _, mask = long_run
    conf = load_run_confounds(bold, spec, 111)
    voxels = NiftiMasker(mask, standardize=None).fit_transform(bold).astype(np.float64)
    voxels[:, :5] += 1e3  # a scale far from the others' (0 mean for psc must not be hit)
    want = clean(voxels, confounds=conf.table, sample_mask=conf.sample_mask,
                 detrend=opts.detrend, standardize=opts.standardize, standardize_confounds=True,
                 t_r=TR, low_pass=opts.low_pass, high_pass=opts.high_pass)
    _assert_same(clean_voxels(voxels, conf.table, conf.sample_mask, opts), want)
    np.testing.assert_allclose(clean_voxels(voxels, conf.table, conf.sample_mask, opts), want,
                               rtol=1e-7, atol=1e-9 * np.abs(want).max())


def test_voxels_rank_deficient_confounds_as_nilearn(rng):
    """A confound repeated (and one all zero) is dropped at nilearn's tolerance, not doubled."""
    n_t = 60
    base = rng.normal(size=(n_t, 3))
    confounds = np.c_[base, base[:, 0] * 2.0, np.zeros(n_t)]
    signals = rng.normal(10, 2, size=(n_t, 25)) + base @ rng.normal(size=(3, 25))
    opts = CleanOptions(t_r=TR, detrend=True)
    want = clean(signals, confounds=confounds, detrend=True, standardize=None,
                 standardize_confounds=True, t_r=TR)
    np.testing.assert_allclose(clean_voxels(signals, confounds, None, opts), want,
                               rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("opts", OPTIONS, ids=range(len(OPTIONS)))
def test_float32_voxels_equal_nilearn_clean_in_float64(long_run, opts):
    """Voxel series as the files store them (float32, on a BOLD baseline far above their
    fluctuations) are cleaned in float32, and still give what ``clean`` gives for the same
    values in float64, to 1e-5 of the signal scale."""
    from nilearn.maskers import NiftiMasker

    bold, _, mask = long_run
    conf = load_run_confounds(bold, ConfoundsSpec("simple"), 111)
    raw = NiftiMasker(mask, standardize=None).fit_transform(bold)
    voxels = (raw - raw.mean(axis=0) + 800.0 + 0.01 * raw.std(axis=0)).astype(np.float32)
    ours = clean_voxels(voxels, conf.table, conf.sample_mask, opts)
    assert ours.dtype == np.float32
    want = clean(voxels.astype(np.float64), confounds=conf.table, sample_mask=conf.sample_mask,
                 detrend=opts.detrend, standardize=opts.standardize, standardize_confounds=True,
                 t_r=TR, low_pass=opts.low_pass, high_pass=opts.high_pass)
    _assert_same(ours, want)
    if opts.standardize is None and not opts.detrend and opts.high_pass is None:
        # the baseline is kept: the error is measured against the fluctuations too
        fluct = want - want.mean(axis=0)
        assert np.abs(ours - want).max() <= 1e-4 * np.abs(fluct).max()
